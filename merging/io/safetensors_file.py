"""Safetensors files read and written tensor by tensor with plain file I/O.

Reading uses pread into a fresh buffer instead of mmap, so pages of a file already merged never count
towards the process's resident memory; writing lays out the whole file first (header, then a sparse
file of the final size) and then fills each tensor at its offset, in any order, so no shard is ever held
in memory. The format: 8-byte little-endian header length, a JSON header mapping each tensor to
{dtype, shape, data_offsets}, then the data bytes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000
HEADER_ALIGNMENT = 8


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, without its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file ({why}); re-save or re-download it")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; the data must cover the file exactly as declared."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, f"file is {size} bytes, too short for a header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise _corrupt(path, f"header claims {header_len} bytes but the file has {size}")
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        header = json.loads(raw, object_pairs_hook=_refuse_duplicate_names)
    except _DuplicateName as exc:
        raise _corrupt(path, f"tensor {exc.args[0]!r} appears twice in the header") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise _corrupt(path, f"bad header entry for tensor {name!r}: not a JSON object")
        if entry.get("dtype") not in DTYPES:
            raise _corrupt(path, f"tensor {name!r} has dtype {entry.get('dtype')!r}, not one of {', '.join(DTYPES)}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (_integers(shape) and _integers(offsets) and len(offsets) == 2):
            raise _corrupt(path, f"bad header entry for tensor {name!r}: shape and data_offsets must be lists of "
                                 "integers")
        dtype, shape = DTYPES[entry["dtype"]], tuple(shape)
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or any(d < 0 for d in shape):
            raise _corrupt(path, f"tensor {name!r} has offsets {begin}..{end} for {nbytes} bytes")
        if end > data_size:
            raise _corrupt(path, f"truncated: tensor {name!r} ends at byte {end} of {data_size}")
        infos[name] = TensorInfo(name, dtype, shape, path, data_start + begin, nbytes)
    _refuse_overlaps(path, infos)
    return infos


def _integers(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


class _DuplicateName(ValueError):
    pass


def _refuse_duplicate_names(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json.loads keeps the last of two equal keys; two tensors of one name would make the file ambiguous."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateName(key)
        result[key] = value
    return result


def _refuse_overlaps(path: Path, infos: dict[str, TensorInfo]) -> None:
    """Two tensors sharing bytes: writing one would change the other, and reading them is not what was saved."""
    by_offset = sorted((info for info in infos.values() if info.nbytes), key=lambda info: info.offset)
    for before, after in zip(by_offset, by_offset[1:], strict=False):
        if after.offset < before.offset + before.nbytes:
            raise _corrupt(path, f"tensors {before.name!r} and {after.name!r} overlap (bytes "
                                 f"{after.offset}..{before.offset + before.nbytes} are in both)")


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes into a fresh CPU tensor (no mmap, no pickle)."""
    buffer = torch.empty(info.nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    filled = 0
    with open(info.path, "rb", buffering=0) as f:
        fd = f.fileno()
        while filled < info.nbytes:
            got = os.preadv(fd, [view[filled:]], info.offset + filled)
            if got == 0:
                raise _corrupt(info.path, f"truncated while reading tensor {info.name!r}")
            filled += got
    return buffer.view(info.dtype).reshape(info.shape)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without copying."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class SafetensorsFileWriter:
    """A safetensors file whose layout is fixed up front and whose tensors are written in any order."""

    def __init__(self, path: Path, layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = path
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._slots: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        cursor = 0
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [cursor, cursor + nbytes]}
            self._slots[name] = (cursor, nbytes, dtype, tuple(shape))
            cursor += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
        self._data_start = 8 + len(encoded)
        self.size = self._data_start + cursor
        self._written: set[str] = set()
        self._filled: dict[str, int] = {}  # bytes written so far of tensors written in ranges
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._fd, struct.pack("<Q", len(encoded)) + encoded)
        with contextlib.suppress(OSError):  # blocks allocated up front: cheaper writes than into a sparse file
            os.posix_fallocate(self._fd, 0, self.size)
        os.ftruncate(self._fd, self.size)

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, nbytes, dtype, shape = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, "
                             f"layout says {dtype} {shape}")
        self._pwrite(tensor_bytes(tensor), self._data_start + offset)
        self._written.add(name)

    def write_range(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Entries start.. of tensor `name` (flat, in row-major order) from a 1-D TENSOR of its dtype; the tensor
        counts as written once every byte of it has been written (ranges must not overlap)."""
        offset, nbytes, dtype, _ = self._slots[name]
        count = tensor.numel() * dtype.itemsize
        if tensor.dtype != dtype or start < 0 or start * dtype.itemsize + count > nbytes:
            raise ValueError(f"tensor {name!r}: entries {start}..{start + tensor.numel()} of {tensor.dtype} do not fit "
                             f"its {dtype} slot of {nbytes // dtype.itemsize} entries")
        self._pwrite(tensor_bytes(tensor), self._data_start + offset + start * dtype.itemsize)
        self._filled[name] = self._filled.get(name, 0) + count
        if self._filled[name] == nbytes:
            self._written.add(name)

    def _pwrite(self, data: memoryview, position: int) -> None:
        written = 0
        while written < len(data):
            written += os.pwrite(self._fd, data[written:], position + written)

    def missing(self) -> list[str]:
        return [name for name in self._slots if name not in self._written]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
