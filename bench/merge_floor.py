"""The floor of a merge on this machine, for bench/merge_speed.py: start a process that imports torch and mergeplan,
read every input byte from the page cache (pread into one reused buffer), write every output byte (pwrite into a
preallocated file), each at its measured single-stream speed, medians of 3."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Floor:
    """The least time one merge can take here: start a process, read every input byte, write every output byte."""

    startup_s: float
    read_gb: float
    read_s: float
    write_gb: float
    write_s: float

    @property
    def seconds(self) -> float:
        return self.startup_s + self.read_s + self.write_s

    def describe(self) -> str:
        return (f"floor {self.seconds:.2f} s = start-up {self.startup_s:.2f} s + read {self.read_gb:.2f} GB in "
                f"{self.read_s:.2f} s ({self.read_gb / self.read_s:.1f} GB/s) + write {self.write_gb:.2f} GB in "
                f"{self.write_s:.2f} s ({self.write_gb / self.write_s:.1f} GB/s)")


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def measure_floor(folders: list[Path], out_bytes: int, scratch: Path, startup: Callable[[], float],
                  repeats: int = 3) -> Floor:
    """This machine's floor for merging FOLDERS (page cache warm) into OUT_BYTES of output; STARTUP runs a child
    process that imports what a merge imports and returns its wall time."""
    files = [path for folder in folders for path in sorted(folder.glob("*.safetensors"))]
    buffer = memoryview(bytearray(1 << 24))

    def read_all() -> None:
        for path in files:
            fd, position = os.open(path, os.O_RDONLY), 0
            while got := os.preadv(fd, [buffer], position):
                position += got
            os.close(fd)

    def write_all() -> None:
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.posix_fallocate(fd, 0, out_bytes)
        for position in range(0, out_bytes, len(buffer)):
            os.pwrite(fd, buffer[: min(len(buffer), out_bytes - position)], position)
        os.close(fd)

    startups = [startup() for _ in range(repeats)]
    reads, writes = [], []
    for _ in range(repeats):
        reads.append(_timed(read_all))
        writes.append(_timed(write_all))
        scratch.unlink()
    return Floor(statistics.median(startups), sum(p.stat().st_size for p in files) / 1e9, statistics.median(reads),
                 out_bytes / 1e9, statistics.median(writes))
