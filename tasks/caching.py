"""Prefect task caching keyed on content: the same inputs (by sha256, not by path or time) are never recomputed.

A cached task's result is persisted as JSON (never pickle) in the flow's result storage; `content_cache` keys it
on a content key that the task's first argument carries (`.cache_key`). Jobs whose result is a local folder also
say where (`.output`); call such tasks through `fresh`, which refreshes the cache when that folder is gone (a
cleaned cache), so that a cached result never names a missing folder.

That makes STATE/work (merged models with their accumulators, sweep tables, fits, law reports: each job's
folder work/KIND/KEY) a cache too, with a size limit (infra.cache.collect_work_garbage). `fresh` holds the job's
folder for the process's life and marks it used, so a running flow keeps what it made or reuses.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

from prefect import Task
from prefect.cache_policies import CacheKeyFnPolicy, CachePolicy
from prefect.context import TaskRunContext

from infra.cache import hold_folder, job_folder, work_folder
from infra.settings import Settings
from merging.io.hashing import sha256_file

RESULT_SERIALIZER = "json"
P = ParamSpec("P")
R = TypeVar("R")


class ContentKeyed(Protocol):
    @property
    def cache_key(self) -> str: ...


def content_hash(value: Any) -> str:
    """sha256 of VALUE as canonical JSON (sorted keys; paths and other objects as strings)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tree_hash(path: Path) -> str:
    """One sha256 of a file, or of every file under a folder (by relative path)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    return content_hash({p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*"))
                         if p.is_file()})


def _key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    job = next(iter(parameters.values()))
    return f"{context.task.name}-{job.cache_key}"


def content_cache() -> CachePolicy:
    """Cache on the content key of the task's first argument."""
    return CacheKeyFnPolicy(cache_key_fn=_key)


def fresh(task: Task[P, R], job: ContentKeyed) -> Task[P, R]:
    """TASK, told to recompute and overwrite its cached result when JOB's output folder does not exist; that folder
    is held (kept from garbage collection) for as long as this process lives."""
    output = getattr(job, "output", None)
    if output is None:
        return task
    hold_folder(job_folder(Path(output), work_folder(Settings.from_env())))
    return task if Path(output).exists() else task.with_options(refresh_cache=True)


def result_storage(settings: Settings) -> Path:
    """Where flows persist task results and cache records: next to the download cache, on local disk."""
    return (settings.state_dir / "results").resolve()
