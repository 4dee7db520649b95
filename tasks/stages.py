"""Wall time and peak memory of one stage of a flow (measured inside its task), and each stage's wall time as the
flow sees it; for MLflow metrics and the benchmark."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
from pydantic import BaseModel

_SAMPLE_S = 0.02


class StageCost(BaseModel):
    seconds: float = 0.0
    peak_rss_mb: float = 0.0  # the process's resident memory, sampled while the stage ran


@contextmanager
def measured() -> Iterator[StageCost]:
    """Fills the yielded StageCost when the block ends. RSS is sampled on a thread: the process-wide peak
    (ru_maxrss) would report the largest stage so far, not this one."""
    cost = StageCost()
    process = psutil.Process()
    done = threading.Event()
    peak = [process.memory_info().rss]

    def sample() -> None:
        while not done.wait(_SAMPLE_S):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        cost.peak_rss_mb = max(peak[0], process.memory_info().rss) / 2**20


class StageClock:
    """Wall time per stage as the flow sees it (compute plus orchestration)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._mark = self.started

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._mark
        self._mark = now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.started
