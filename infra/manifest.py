"""A stored folder's manifest.json: every file of the folder with its sha256 and size, written last, so a folder
whose manifest exists is complete. The sha256 of the manifest's own bytes identifies the folder's version."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from infra.errors import StorageError
from merging.errors import CheckpointError
from merging.io.checkpoint import PICKLE_SUFFIXES
from merging.io.hashing import sha256_file

MANIFEST = "manifest.json"


class ManifestEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


_MANIFEST_FILES = TypeAdapter(dict[str, ManifestEntry])


@dataclass(frozen=True)
class Manifest:
    """A stored folder's file list; sha256 is the hash of the manifest's own bytes, which identifies the version."""

    files: dict[str, ManifestEntry]
    sha256: str
    raw: bytes = field(repr=False)


def folder_files(folder: Path) -> dict[str, Path]:
    """The folder's files by their relative POSIX name; refuses pickles."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        # Dot files are tool state (.cache/huggingface, .DS_Store), not part of the checkpoint.
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: pickle file; mergeplan never stores or loads pickles (they can run "
                                  "code); remove it or convert to safetensors")
        files[relative.as_posix()] = path
    return files


def manifest_of(files: dict[str, Path]) -> Manifest:
    """The manifest of FILES (stored name -> local file), as the bytes that are stored."""
    entries = {name: ManifestEntry(sha256=sha256_file(path), size=path.stat().st_size) for name, path in files.items()}
    raw = json.dumps({name: entry.model_dump() for name, entry in entries.items()}, indent=1).encode()
    return Manifest(entries, hashlib.sha256(raw).hexdigest(), raw)


def manifest_files(raw: bytes) -> dict[str, ManifestEntry]:
    """The entries of a manifest's bytes (raises pydantic's ValidationError on anything else)."""
    return _MANIFEST_FILES.validate_json(raw)


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """The manifest in RAW (read from WHERE, named in errors), validated: safe relative names, sha256 and size for
    each, no pickles."""
    try:
        files = manifest_files(raw)
    except ValidationError as exc:
        raise StorageError(f"{where}: not a manifest ({exc.errors()[0]['msg']}); re-upload the folder") from exc
    for name in files:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or "\\" in name or not name or name == MANIFEST:
            raise StorageError(f"{where}: unsafe file name {name!r}; re-upload it")
        if path.suffix in PICKLE_SUFFIXES:
            raise StorageError(f"{where}: lists pickle file {name}; mergeplan never loads pickles")
    return Manifest(files, hashlib.sha256(raw).hexdigest(), raw)
