"""The scaling sweep as Prefect tasks: one task per part (a method and the expert counts k of the part settings'
`ks`; each a `merging.sweep.run.run_sweep` over those subsets of the design, sharing their task vectors), a task that
joins their tables, and the law fit of the joined table (`merging.scaling_law.fit_folder.fit_sweep`). Each is cached on
content.

A part's task fetches its own inputs from S3 (the cache of the worker's machine), the evaluation data included
when it is in the store, so that it runs on any Dask worker (a local data folder must be seen by every worker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict

from infra.cache import work_folder
from infra.settings import Settings
from merging.scaling_law.fit_folder import FitSettings, fit_sweep
from merging.sweep.run import SweepSettings, run_sweep
from merging.sweep.table import read_table, write_table
from merging.zoo.layout import SizeFamily
from tasks.caching import RESULT_SERIALIZER, content_cache, content_hash
from tasks.fetch import CheckpointRef, local_copy
from tasks.stages import StageCost, measured

TABLE = "sweep.parquet"


class SweepPart(BaseModel):
    """The sweep of one method over the subsets of BASE's experts (those of size k in settings' ks, when given)."""

    model_config = ConfigDict(frozen=True)
    base: CheckpointRef
    experts: list[CheckpointRef]
    data: CheckpointRef
    method: str
    settings: dict[str, Any]  # SweepSettings fields (methods is this part's one method)

    @property
    def cache_key(self) -> str:
        return content_hash({"base": self.base.sha256, "experts": [(e.name, e.sha256) for e in self.experts],
                             "data": self.data.sha256, "method": self.method, "settings": self.settings})

    @property
    def output(self) -> Path:
        return work_folder(Settings.from_env(), "sweeps", self.cache_key) / TABLE


class SweepTable(BaseModel):
    path: Path
    merges: int
    cost: StageCost


def _size_family(part: SweepPart) -> SizeFamily:
    """The local copies of the part's base and experts as one size, named after the base. The experts go in name
    order, as a zoo's experts/ folder lists them: that order writes the subset labels and seeds DARE's masks."""
    experts = sorted(part.experts, key=lambda e: e.name)
    return SizeFamily(part.base.name, local_copy(part.base).path, tuple((e.name, local_copy(e).path) for e in experts))


@task(name="sweep-method", cache_policy=content_cache(), persist_result=True, result_serializer=RESULT_SERIALIZER,
      task_run_name="sweep {part.method}")
def sweep_method(part: SweepPart) -> SweepTable:
    with measured() as cost:
        report = run_sweep([_size_family(part)], local_copy(part.data).path, part.output,
                           SweepSettings(**part.settings | {"methods": (part.method,)}))
    return SweepTable(path=part.output, merges=report.groups, cost=cost)


class FitJob(BaseModel):
    model_config = ConfigDict(frozen=True)
    tables: list[SweepTable]
    settings: dict[str, Any]  # FitSettings fields

    @property
    def cache_key(self) -> str:
        return content_hash({"tables": [str(t.path) for t in self.tables], "settings": self.settings})

    @property
    def output(self) -> Path:
        return work_folder(Settings.from_env(), "fits", self.cache_key)


class SweepFit(BaseModel):
    table: Path
    fit: Path
    summary: list[dict[str, Any]]


@task(name="fit-sweep", cache_policy=content_cache(), persist_result=True, result_serializer=RESULT_SERIALIZER)
def fit_tables(job: FitJob) -> SweepFit:
    """The methods' tables joined into one (written beside the fit) and the law fitted on it."""
    job.output.mkdir(parents=True, exist_ok=True)
    table = job.output / TABLE
    rows = []
    for part in job.tables:
        columns = read_table(part.path)
        rows += [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    write_table(rows, table)
    report = fit_sweep(table, job.output / "fit", FitSettings(**job.settings), overwrite=True)
    return SweepFit(table=table, fit=report.folder, summary=report.summary)
