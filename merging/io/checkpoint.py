"""Hugging Face checkpoint folders: a lazy per-tensor reader, a sharded atomic writer, compatibility checks.

A folder holds config.json and either model.safetensors or shards listed in model.safetensors.index.json.
Pickle checkpoints (.bin, .pt, ...) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from merging.errors import CheckpointError
from merging.io.safetensors_file import SafetensorsFileWriter, TensorInfo, read_header, read_tensor

log = logging.getLogger("mergeplan")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files a merged model takes from its base, so that it loads and tokenizes like the base.
COMPANION_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
# Config fields that must agree for two checkpoints to be fine-tunes of one base.
STRUCTURAL_FIELDS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
    "hidden_act", "rope_theta", "rope_parameters",
)
DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB' or '500MiB' (GB = 10^9, GiB = 2^30, as in HF)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
        if not match or match.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"size {size!r} is not a number of bytes like '5GB' or '500MiB'")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size {size!r} must be positive")
    return value


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read as JSON ({exc}); repair or re-download it") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def refuse_pickles(folder: Path, what: str) -> None:
    """Name the pickle files of a folder that has no safetensors `what`: mergeplan never loads them."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{folder}: only pickle {what} ({', '.join(pickles)}); mergeplan never unpickles. "
                              "Convert to safetensors, e.g. model.save_pretrained(folder, safe_serialization=True)")


class CheckpointReader:
    """A checkpoint folder whose tensors are read one at a time, on demand."""

    def __init__(self, folder: str | Path, *, prefix: str = "model", config_name: str = "config.json"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: no such checkpoint folder")
        config_path = self.folder / config_name
        if not config_path.is_file():
            raise CheckpointError(f"{self.folder}: no {config_name}; a checkpoint is a Hugging Face model folder")
        self.config = _load_json(self._inside(config_path))
        self.tensors: dict[str, TensorInfo] = self._index_tensors(prefix)

    def _index_tensors(self, prefix: str) -> dict[str, TensorInfo]:
        single_file, index_file = f"{prefix}.safetensors", f"{prefix}.safetensors.index.json"
        index_path = self.folder / index_file
        if index_path.is_file():
            weight_map = _load_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no weight_map; re-save the checkpoint")
            headers: dict[str, dict[str, TensorInfo]] = {}
            for shard in dict.fromkeys(weight_map.values()):
                if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                    raise CheckpointError(f"{index_path}: names shard {shard!r}, which is not a file name in the "
                                          "folder (no paths, no ..); re-save the checkpoint")
                shard_path = self._inside(self.folder / shard)
                if not shard_path.is_file():
                    raise CheckpointError(f"{index_path}: names shard {shard} which is missing; "
                                          "copy or re-download it")
                headers[shard] = read_header(shard_path)
            tensors = {}
            for name, shard in weight_map.items():
                if name not in headers[shard]:
                    raise CheckpointError(f"{index_path}: tensor {name} is not in shard {shard}")
                tensors[name] = headers[shard][name]
        elif (self.folder / single_file).is_file():
            tensors = read_header(self._inside(self.folder / single_file))
        else:
            refuse_pickles(self.folder, "weights")
            raise CheckpointError(f"{self.folder}: no {single_file} or {index_file}")
        return dict(sorted(tensors.items(), key=lambda item: (str(item[1].path), item[1].offset)))

    def _inside(self, path: Path) -> Path:
        """PATH, refused when it is a link that leads out of the folder (a checkpoint is one self-contained folder),
        except into the blobs/ of the Hugging Face cache repo whose snapshot the folder is."""
        target, folder = path.resolve(), self.folder.resolve()
        snapshots = folder.parent
        if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--") and \
                target.is_relative_to(snapshots.parent / "blobs"):
            return path
        if not target.is_relative_to(folder):
            raise CheckpointError(f"{path}: a link to {path.resolve()}, outside {self.folder}; copy the file into the "
                                  "folder instead")
        return path

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.tensors[name])

    def fingerprint(self) -> str:
        """Identifies the tensor layout (names, dtypes, shapes) and config, not the values."""
        layout = [(n, str(i.dtype), i.shape) for n, i in self.tensors.items()]
        return json.dumps([self.config.get(k) for k in STRUCTURAL_FIELDS] + layout)

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.folder)!r})"


class RangeReader:
    """Runs of a tensor's entries read with pread into a caller's reused buffer (no fresh pages to fault in per read,
    and a buffer that stays in the CPU cache); each file is opened once and stays open until close()."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read(self, info: TensorInfo, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        """Entries start..stop of tensor INFO (flat, row-major) read into the front of BUFFER (a CPU uint8 tensor large
        enough): a 1-D tensor of INFO's dtype sharing BUFFER's memory."""
        size = info.dtype.itemsize
        view = memoryview(buffer.numpy())[: (stop - start) * size]
        fd, position, filled = self._fd(info.path), info.offset + start * size, 0
        while filled < len(view):
            got = os.preadv(fd, [view[filled:]], position + filled)
            if got == 0:
                raise CheckpointError(f"{info.path}: truncated while reading tensor {info.name}; re-save or "
                                      "re-download it")
            filled += got
        return buffer[: len(view)].view(info.dtype)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_compatible(base: CheckpointReader, expert: CheckpointReader) -> None:
    """Refuse an expert that is not a fine-tune of the base; warn where it differs only in dtype."""
    for field in STRUCTURAL_FIELDS:
        if base.config.get(field) != expert.config.get(field):
            raise CheckpointError(
                f"{expert.folder}/config.json: {field} is {expert.config.get(field)!r}, the base "
                f"{base.folder} has {base.config.get(field)!r}; experts must be fine-tunes of the base")
    missing = [n for n in base.tensors if n not in expert.tensors]
    if missing:
        raise CheckpointError(f"{expert.folder}: lacks tensor {missing[0]} that the base has "
                              f"({len(missing)} missing); was it saved from the same architecture?")
    extra = [n for n in expert.tensors if n not in base.tensors]
    if extra:
        raise CheckpointError(f"{expert.folder}: has tensor {extra[0]} that the base lacks "
                              f"({len(extra)} extra); was it saved from the same architecture?")
    upcast = []
    for name, info in base.tensors.items():
        other = expert.tensors[name]
        if other.shape != info.shape:
            hint = " (vocabulary resized? merge only experts with the base's vocabulary)" if (
                "embed" in name or "lm_head" in name) else ""
            raise CheckpointError(f"{expert.folder}: tensor {name} has shape {list(other.shape)}, "
                                  f"the base has {list(info.shape)}{hint}")
        if other.dtype != info.dtype:
            upcast.append(name)
    if upcast:
        log.warning("%s: %d tensors differ in dtype from the base (e.g. %s: %s vs %s); computing in float32",
                    expert.folder, len(upcast), upcast[0], expert.tensors[upcast[0]].dtype,
                    base.tensors[upcast[0]].dtype)


@contextmanager
def staged_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden sibling folder to write into, renamed over `target` when the block succeeds and removed when it
    fails: a half-written folder never appears under its real name, and an existing one is replaced only whole."""
    def refuse_existing() -> None:
        if target.exists() and not overwrite:
            raise CheckpointError(f"{target}: output folder exists; pass --overwrite or choose another")

    refuse_existing()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        refuse_existing()  # it may have appeared while the folder was written
        if target.exists():
            retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def plan_shards(layout: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_size: int,
                ) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split a tensor layout, in order, into shards of at most max_shard_size bytes (a bigger tensor alone)."""
    shards: list[list] = [[]]
    filled = 0
    for entry in layout:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if shards[-1] and filled + nbytes > max_shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(entry)
        filled += nbytes
    return shards


class CheckpointWriter:
    """Writes a sharded safetensors folder into a temporary sibling, renamed into place when complete.

    Use as a context manager: on an exception nothing is left behind, and an existing target is untouched.
    """

    def __init__(self, target: str | Path, layout: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], *,
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False, prefix: str = "model"):
        self.target = Path(target)
        if self.target.exists() and not overwrite:
            raise CheckpointError(f"{self.target}: output folder exists; pass --overwrite or choose another")
        self._layout = list(layout)
        self._max_shard_size = max_shard_size
        self._prefix = prefix
        self._folder = staged_folder(self.target, overwrite)
        self.staging: Path | None = None
        self._files: list[SafetensorsFileWriter] = []
        self._file_of: dict[str, SafetensorsFileWriter] = {}

    def __enter__(self) -> CheckpointWriter:
        self.staging = self._folder.__enter__()
        shards = plan_shards(self._layout, self._max_shard_size)
        for number, shard in enumerate(shards, start=1):
            filename = (f"{self._prefix}.safetensors" if len(shards) == 1
                        else f"{self._prefix}-{number:05d}-of-{len(shards):05d}.safetensors")
            writer = SafetensorsFileWriter(self.staging / filename, shard)
            self._files.append(writer)
            self._file_of.update({name: writer for name in writer.names})
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._file_of[name].write(name, tensor)

    def write_range(self, name: str, start: int, tensor: torch.Tensor) -> None:
        """Entries start.. of tensor `name` (flat, row-major) from the 1-D CPU TENSOR; thread-safe across tensors."""
        self._file_of[name].write_range(name, start, tensor)

    def write_json(self, filename: str, data: Mapping) -> None:
        path = self.staging / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def write_text(self, filename: str, text: str) -> None:
        (self.staging / filename).write_text(text)

    def staged(self, filename: str) -> Path:
        """Where a file written by other code (a plot) goes so that it lands in the folder with the rest."""
        return self.staging / filename

    def copy_companions(self, source: Path, filenames: Iterable[str] = COMPANION_FILES) -> None:
        for filename in filenames:
            if (source / filename).is_file():
                shutil.copy2(source / filename, self.staging / filename)

    def _finish(self) -> None:
        for file in self._files:
            file.close()
        missing = [name for file in self._files for name in file.missing()]
        if missing:
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {missing[0]}")
        if len(self._files) > 1:
            total = sum(math.prod(s) * d.itemsize for _, d, s in self._layout)
            weight_map = {name: f.path.name for f in self._files for name in f.names}
            self.write_json(f"{self._prefix}.safetensors.index.json",
                            {"metadata": {"total_size": total}, "weight_map": weight_map})

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        except BaseException as error:
            exc_type, exc, tb = type(error), error, error.__traceback__
            raise
        finally:
            for file in self._files:
                file.close()
            self._folder.__exit__(exc_type, exc, tb)
