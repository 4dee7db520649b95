"""The floor of a merge on this machine, for bench/merge_speed.py: start a process that imports what a merge imports,
read every input byte from the page cache, write every output byte into the page cache, and nothing else.

Reads and writes use as many threads as the merge has workers (pread into a reused 512 KiB buffer per thread, pwrite
into a preallocated file), so the floor is what this machine's memory and page cache allow with its cores, not one
stream's speed. Before each timed write the dirty pages of earlier writes are flushed (untimed): a merge writes its
output once, below the kernel's dirty-page limits, and so is not throttled by the disk; neither should the floor be.
Medians of 3.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 19


@dataclass
class Floor:
    """The least time one merge can take here: start a process, read every input byte, write every output byte."""

    startup_s: float
    read_gb: float
    read_s: float
    write_gb: float
    write_s: float
    threads: int

    @property
    def seconds(self) -> float:
        return self.startup_s + self.read_s + self.write_s

    def describe(self) -> str:
        return (f"floor {self.seconds:.2f} s = start-up {self.startup_s:.2f} s + read {self.read_gb:.2f} GB in "
                f"{self.read_s:.2f} s ({self.read_gb / self.read_s:.1f} GB/s) + write {self.write_gb:.2f} GB in "
                f"{self.write_s:.2f} s ({self.write_gb / self.write_s:.1f} GB/s), {self.threads} threads")


def _read(paths: list[Path]) -> None:
    buffer = memoryview(bytearray(CHUNK))
    for path in paths:
        fd, position = os.open(path, os.O_RDONLY), 0
        while got := os.preadv(fd, [buffer], position):
            position += got
        os.close(fd)


def _write(fd: int, start: int, stop: int) -> None:
    buffer = memoryview(bytearray(CHUNK))
    for position in range(start, stop, CHUNK):
        os.pwrite(fd, buffer[: min(CHUNK, stop - position)], position)


def measure_floor(folders: list[Path], out_bytes: int, scratch: Path, startup: Callable[[], float],
                  threads: int = 2, repeats: int = 3) -> Floor:
    """This machine's floor for merging FOLDERS (page cache warm) into OUT_BYTES of output; STARTUP runs a child
    process that imports what a merge imports and returns its wall time."""
    files = [path for folder in folders for path in sorted(folder.glob("*.safetensors"))]
    share = -(-out_bytes // threads)

    def read_all() -> float:
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(_read, [files[i::threads] for i in range(threads)]))
        return time.perf_counter() - start

    def write_all() -> float:
        os.sync()  # untimed: no dirty pages left from earlier writes
        start = time.perf_counter()
        fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.posix_fallocate(fd, 0, out_bytes)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: _write(fd, i * share, min(out_bytes, (i + 1) * share)), range(threads)))
        os.close(fd)
        seconds = time.perf_counter() - start
        scratch.unlink()
        return seconds

    startups = [startup() for _ in range(repeats)]
    reads = [read_all() for _ in range(repeats)]
    writes = [write_all() for _ in range(repeats)]
    return Floor(statistics.median(startups), sum(p.stat().st_size for p in files) / 1e9, statistics.median(reads),
                 out_bytes / 1e9, statistics.median(writes), threads)
