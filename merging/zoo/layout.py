"""The layout of a zoo folder: its model folders, their file hashes, and its base sizes as size families
(a base and its named experts: what a sweep merges).

    manifest.json  tokenizer/  data/DOMAIN/{train,calib,eval}.jsonl
    base/  experts/DOMAIN/  mixture/                 (presets with one base size)
    SIZE/base/  SIZE/experts/DOMAIN/  SIZE/mixture/  (presets with several base sizes, e.g. `sizes`)

Each model folder holds a RECIPE_FILE, written last by the build: a folder with one is complete.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from merging.errors import ConfigError
from merging.io.checkpoint import CheckpointReader
from merging.io.hashing import sha256_file

RECIPE_FILE = "zoo_recipe.json"


@dataclass(frozen=True)
class SizeFamily:
    """One base size: its name, its base checkpoint and its experts as (name, folder), in pool order (a sweep's
    subset holds indices into it, and DARE seeds each expert's mask by that index)."""

    name: str
    base: Path
    experts: tuple[tuple[str, Path], ...]

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.experts)

    @property
    def expert_folders(self) -> tuple[Path, ...]:
        return tuple(folder for _, folder in self.experts)


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != RECIPE_FILE}


def expert_folders(zoo_dir: Path) -> list[Path]:
    """The expert checkpoints of a one-size zoo, sorted by domain."""
    return sorted(p for p in (zoo_dir / "experts").iterdir() if p.is_dir())


def zoo_families(zoo: Path) -> list[SizeFamily]:
    """The base sizes of a zoo: base/ + experts/ at the top (one size), or in SIZE/ folders (several sizes); in
    each, the experts are named after their folders and sorted by name."""
    if not zoo.is_dir():
        raise ConfigError(f"{zoo}: no such zoo folder (build one with mergeplan zoo build)")
    if (zoo / "base").is_dir():
        return [_family(zoo, _single_size_name(zoo))]
    families = [_family(folder, folder.name) for folder in sorted(zoo.iterdir())
                if (folder / "base").is_dir() and (folder / "experts").is_dir()]
    if not families:
        raise ConfigError(f"{zoo}: not a zoo folder (expected base/ and experts/, or SIZE/base/ and SIZE/experts/)")
    return sorted(families, key=lambda family: _parameter_count(CheckpointReader(family.base)))


def _family(folder: Path, name: str) -> SizeFamily:
    if not (folder / "experts").is_dir():
        raise ConfigError(f"{folder}: no experts/ folder next to base/; a sweep merges the experts of a zoo")
    experts = tuple((expert.name, expert) for expert in expert_folders(folder))
    if not experts:
        raise ConfigError(f"{folder / 'experts'}: no expert folders")
    return SizeFamily(name, folder / "base", experts)


def _single_size_name(zoo: Path) -> str:
    manifest = zoo / "manifest.json"
    if manifest.is_file():
        sizes = json.loads(manifest.read_text()).get("preset", {}).get("sizes") or []
        if len(sizes) == 1 and sizes[0].get("name"):
            return str(sizes[0]["name"])
    return zoo.resolve().name


def _parameter_count(reader: CheckpointReader) -> int:
    return sum(math.prod(info.shape) for info in reader.tensors.values())
