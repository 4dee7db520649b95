"""Merging as Prefect tasks: a full merge that keeps its accumulators, the incremental add of one expert from
them, and the upload of a merged model to the store. Each is cached on the merge's content key.

The content key is the sha256 of (base manifest sha256, the experts' manifest sha256s in order, method, params,
seed, calibration data hashes): an incremental merge of K+1 experts has the key of a full merge of the same K+1,
so either one serves the other's cache. Outputs live under STATE_DIR/work/merges/KEY/{model,state}.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict

from infra.cache import collect_work_garbage, work_folder
from infra.s3 import upload_expert
from infra.settings import Settings
from merging.config import ExpertRef, MergeConfig
from merging.merger import add_experts, merge
from merging.methods.registry import is_calibrated
from tasks.caching import RESULT_SERIALIZER, content_cache, content_hash, tree_hash
from tasks.fetch import LocalCheckpoint
from tasks.retrying import IO_TASK_OPTIONS
from tasks.stages import StageCost, measured

log = logging.getLogger("mergeplan")


class MergeJob(BaseModel):
    """One merge: what goes in (local copies, identified by their sha256) and how."""

    model_config = ConfigDict(frozen=True)
    base: LocalCheckpoint
    experts: list[LocalCheckpoint]
    method: str
    params: dict[str, Any]
    seed: int
    calibration: dict[str, Path] = {}

    @property
    def cache_key(self) -> str:
        return content_hash({"base": self.base.ref.sha256, "experts": [e.ref.sha256 for e in self.experts],
                             "method": self.method, "params": self.params, "seed": self.seed,
                             "calibration": {name: tree_hash(path) for name, path in self.calibration.items()}})

    @property
    def folder(self) -> Path:
        return work_folder(Settings.from_env(), "merges", self.cache_key)

    @property
    def output(self) -> Path:
        return self.folder / "model"

    @property
    def keeps_state(self) -> bool:
        return not is_calibrated(self.method)

    def config(self) -> MergeConfig:
        return MergeConfig(base=self.base.path, method=self.method, params=self.params, seed=self.seed,
                           experts=[ExpertRef(path=e.path, name=e.ref.name) for e in self.experts],
                           calibration=self.calibration)

    def extended(self, expert: LocalCheckpoint) -> MergeJob:
        return self.model_copy(update={"experts": [*self.experts, expert]})


class MergedModel(BaseModel):
    model_config = ConfigDict(frozen=True)
    key: str
    path: Path
    state: Path | None  # the accumulators, for the next incremental merge
    experts: list[str]  # names, in merge order
    incremental: bool = False
    cost: StageCost = StageCost()

    @property
    def cache_key(self) -> str:
        return self.key


def _merged(job: MergeJob, cost: StageCost, incremental: bool = False) -> MergedModel:
    """The result of a merge, once STATE/work is back within its limit (the new merge is held: it stays)."""
    settings = Settings.from_env()
    collect_work_garbage(work_folder(settings), int(settings.work_max_gb * 1e9))
    state = job.folder / "state" if job.keeps_state else None
    return MergedModel(key=job.cache_key, path=job.output, state=state, incremental=incremental, cost=cost,
                       experts=[e.ref.name for e in job.experts])


@task(name="merge", cache_policy=content_cache(), persist_result=True, result_serializer=RESULT_SERIALIZER,
      task_run_name="merge {job.method}")
def merge_full(job: MergeJob) -> MergedModel:
    """All of the job's experts at once; the accumulators are kept beside the model (methods that have them)."""
    with measured() as cost:
        merge(job.config(), job.output, overwrite=True, save_state=job.folder / "state" if job.keeps_state else None)
    return _merged(job, cost)


@task(name="merge-incremental", cache_policy=content_cache(), persist_result=True,
      result_serializer=RESULT_SERIALIZER, task_run_name="add {expert.ref.name}")
def merge_incremental(job: MergeJob, previous: MergedModel, expert: LocalCheckpoint) -> MergedModel:
    """JOB (the previous experts plus EXPERT) from PREVIOUS's accumulators, reading only the new expert.

    The updated accumulators go to JOB's own folder: the previous merge stays valid."""
    if previous.state is None or not previous.state.is_dir():
        raise FileNotFoundError(previous.state)
    with measured() as cost:
        add_experts(previous.state, [ExpertRef(path=expert.path, name=expert.ref.name)], job.output,
                    overwrite=True, state_out=job.folder / "state")
    return _merged(job, cost, incremental=True)


class Upload(BaseModel):
    """A merged model to put in the store; cached on the merge's key, so the same model is uploaded once."""

    model_config = ConfigDict(frozen=True)
    model: MergedModel
    s3_uri: str

    @property
    def cache_key(self) -> str:
        return self.model.key


@task(name="upload-merged", **IO_TASK_OPTIONS, cache_policy=content_cache(),
      persist_result=True, result_serializer=RESULT_SERIALIZER)
def upload_merged(upload: Upload) -> str:
    """The S3 URI the merged model now has (the first upload's, when this merge was uploaded before)."""
    manifest = upload_expert(upload.model.path, upload.s3_uri, settings=Settings.from_env())
    log.info("merged model %s in %s (manifest sha256 %s)", upload.model.key[:12], upload.s3_uri, manifest.sha256)
    return upload.s3_uri
