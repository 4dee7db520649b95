"""The scaling sweep as Prefect tasks: one task per merged subset (a method and a subset of the base's experts,
measured by `merging.sweep.run.FamilyEvaluator`), and the law fit of the table their rows make
(`merging.scaling_law.fit_folder.fit_sweep`). Each is cached on content.

A subset's rows are its task's result, persisted as JSON: a sweep stopped midway (a worker or the scheduler gone)
and run again measures only the subsets it had not finished. Subsets are dealt to whichever worker is free; a
worker fetches its inputs from S3 (the cache of its machine), the evaluation data included when it is in the
store (a local data folder must be seen by every worker), and keeps the family it loaded for the next subset.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict, field_validator

from infra.cache import work_folder
from infra.settings import Settings
from merging.scaling_law.fit_folder import FitSettings, fit_sweep
from merging.sweep.run import FamilyEvaluator, Group, SweepSettings, planned_merges
from merging.sweep.table import SUBSET_SEPARATOR, Row, write_table
from merging.zoo.layout import SizeFamily
from tasks.caching import RESULT_SERIALIZER, content_cache, content_hash
from tasks.fetch import CheckpointRef, local_copy
from tasks.stages import StageCost, measured

TABLE = "sweep.parquet"
# What a subset's rows depend on besides its inputs, method and subset (the other settings only choose subsets).
_MEASURE_FIELDS = {"design", "seed", "eval_examples", "batch_size"}


class SweepJob(BaseModel):
    """One merged subset of a sweep: METHOD over the experts SUBSET (indices into EXPERTS, which are in name order,
    as a zoo's experts/ folder lists them: that order labels the subsets and seeds DARE's masks)."""

    model_config = ConfigDict(frozen=True)
    base: CheckpointRef
    experts: list[CheckpointRef]
    data: CheckpointRef
    settings: dict[str, Any]  # SweepSettings fields
    method: str
    k: int
    subset: tuple[int, ...]

    @property
    def label(self) -> str:
        return SUBSET_SEPARATOR.join(self.experts[i].name for i in self.subset)

    @property
    def family_key(self) -> str:
        """What a worker must have loaded to measure this job: the same for every job of one sweep."""
        return content_hash({"base": self.base.sha256, "experts": [(e.name, e.sha256) for e in self.experts],
                             "data": self.data.sha256, "settings": self.settings})

    @property
    def cache_key(self) -> str:
        settings = SweepSettings(**self.settings)
        return content_hash({"base": self.base.sha256, "experts": [(e.name, e.sha256) for e in self.experts],
                             "data": self.data.sha256, "method": self.method,
                             "params": settings.method_params(self.method), "subset": self.subset,
                             "measure": {name: value for name, value in self.settings.items()
                                         if name in _MEASURE_FIELDS}})


def sweep_jobs(base: CheckpointRef, experts: list[CheckpointRef], data: CheckpointRef,
               settings: SweepSettings) -> list[SweepJob]:
    """Every subset the sweep measures, in table order (methods as given, k ascending)."""
    experts = sorted(experts, key=lambda e: e.name)
    fields = settings.model_dump(mode="json")
    return [SweepJob(base=base, experts=experts, data=data, settings=fields, method=method, k=k, subset=subset)
            for method, k, subset in planned_merges(len(experts), settings)]


class SweepMerge(BaseModel):
    """A measured subset: its rows (one per domain), what measuring it cost, and the process that measured it
    (a cached result keeps the first one's)."""

    key: str  # the job's cache key
    rows: list[Row]
    cost: StageCost  # the merge and its evaluation
    load_seconds: float  # fetching and loading the family, when this subset was the process's first of it; else 0
    worker: str  # host:pid

    @field_validator("rows")
    @classmethod
    def _nan_back(cls, rows: list[Row]) -> list[Row]:
        """JSON has no NaN: a persisted CE of NaN (a diverged merge) comes back as null."""
        return [row | {"ce": math.nan} if row["ce"] is None else row for row in rows]


_loaded: dict[str, FamilyEvaluator] = {}  # the family this process measured last, by SweepJob.family_key
_measuring = threading.Lock()  # one subset at a time per process: the loaded model's weights are swapped in place


@contextmanager
def _evaluator(job: SweepJob) -> Iterator[tuple[FamilyEvaluator, float]]:
    """JOB's family loaded in this process, and the seconds it took to fetch and load it here (0 when it was
    already loaded). It is held for this process's next subset; the one loaded before is let go first, so that
    one family at a time is in memory."""
    with _measuring:
        load_seconds = 0.0
        if job.family_key not in _loaded:
            _loaded.clear()
            started = time.perf_counter()
            family = SizeFamily(job.base.name, local_copy(job.base).path,
                                tuple((e.name, local_copy(e).path) for e in job.experts))
            _loaded[job.family_key] = FamilyEvaluator(family, local_copy(job.data).path, SweepSettings(**job.settings))
            load_seconds = time.perf_counter() - started
        yield _loaded[job.family_key], load_seconds


def release_family() -> None:
    """Let go of the family this process holds: a flow's process (the thread runner) calls it once its sweep is done,
    so that a long-lived one (`mergeplan serve`) does not keep the experts' task vectors until the next sweep. A Dask
    worker keeps its family until its next sweep replaces it."""
    with _measuring:
        _loaded.clear()


@task(name="sweep-merge", cache_policy=content_cache(), persist_result=True, result_serializer=RESULT_SERIALIZER,
      task_run_name="sweep {job.method} {job.label}")
def sweep_merge(job: SweepJob) -> SweepMerge:
    with _evaluator(job) as (evaluator, load_seconds), measured() as cost:
        rows = evaluator.rows(Group(evaluator.family, job.method, job.k, job.subset))
    return SweepMerge(key=job.cache_key, rows=rows, cost=cost, load_seconds=load_seconds,
                      worker=f"{socket.gethostname()}:{os.getpid()}")


class FitJob(BaseModel):
    model_config = ConfigDict(frozen=True)
    merges: list[SweepMerge]  # in table order
    settings: dict[str, Any]  # FitSettings fields

    @property
    def cache_key(self) -> str:
        return content_hash({"merges": [merge.key for merge in self.merges], "settings": self.settings})

    @property
    def output(self) -> Path:
        return work_folder(Settings.from_env(), "fits", self.cache_key)


class SweepFit(BaseModel):
    table: Path
    fit: Path
    summary: list[dict[str, Any]]


@task(name="fit-sweep", cache_policy=content_cache(), persist_result=True, result_serializer=RESULT_SERIALIZER)
def fit_tables(job: FitJob) -> SweepFit:
    """The subsets' rows as one table (written beside the fit) and the law fitted on it."""
    job.output.mkdir(parents=True, exist_ok=True)
    table = job.output / TABLE
    write_table([row for merge in job.merges for row in merge.rows], table)
    report = fit_sweep(table, job.output / "fit", FitSettings(**job.settings), overwrite=True)
    return SweepFit(table=table, fit=report.folder, summary=report.summary)
