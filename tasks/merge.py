"""Merging as Prefect tasks: a full merge that keeps its accumulators, the incremental add of one expert from
them, and the upload of a merged model to the store. Each is cached on the merge's content key.

The content key is the sha256 of (base manifest sha256, the experts' manifest sha256s in order, method, params,
seed, calibration data hashes, and for a warm-started calibration the key of the merge whose coefficients it
starts from): an incremental merge of K+1 experts has the key of a full merge of the same K+1, so either one serves
the other's cache. Outputs live under STATE_DIR/work/merges/KEY/{model,state}.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict

from infra.cache import collect_work_garbage, hold_folder, work_folder
from infra.errors import StorageError
from infra.mlflow_model import mlflow_model_files
from infra.s3 import read_json_file, read_manifest, upload_expert
from infra.settings import Settings
from merging.calibration.coefficients import COEFFICIENTS_FILE
from merging.config import ExpertRef, MergeConfig
from merging.merger import add_experts, merge
from merging.methods.registry import is_calibrated, methods_of_kind
from tasks.caching import RESULT_SERIALIZER, content_cache, content_hash, tree_hash
from tasks.fetch import LocalCheckpoint, local_copy
from tasks.retrying import IO_TASK_OPTIONS
from tasks.stages import StageCost, measured

log = logging.getLogger("mergeplan")
GPU = "GPU"  # the Dask worker resource of a GPU: `dask worker ADDRESS --resources GPU=1`


def merge_folder(key: str) -> Path:
    """STATE/work/merges/KEY: the merge's output (model/) and accumulators (state/)."""
    return work_folder(Settings.from_env(), "merges", key)


class WarmStart(BaseModel):
    """Where a calibration starts: a local copy of the coefficients.json of an earlier calibrated merge over some
    of the experts, identified by that merge's content key (where the file lies is no part of a merge's key)."""

    model_config = ConfigDict(frozen=True)
    coefficients: Path
    merge_key: str


class MergeJob(BaseModel):
    """One merge: what goes in (local copies, identified by their sha256) and how."""

    model_config = ConfigDict(frozen=True)
    base: LocalCheckpoint
    experts: list[LocalCheckpoint]
    method: str
    params: dict[str, Any]
    seed: int
    calibration: dict[str, Path] = {}
    warm_start: WarmStart | None = None  # calibrated methods: start from an earlier merge's coefficients

    @property
    def cache_key(self) -> str:
        identity = {"base": self.base.ref.sha256, "experts": [e.ref.sha256 for e in self.experts],
                    "method": self.method, "params": self.params, "seed": self.seed,
                    "calibration": {name: tree_hash(path) for name, path in self.calibration.items()}}
        if self.warm_start is not None:
            identity["warm_start"] = self.warm_start.merge_key
        return content_hash(identity)

    @property
    def folder(self) -> Path:
        return merge_folder(self.cache_key)

    @property
    def output(self) -> Path:
        return self.folder / "model"

    @property
    def keeps_state(self) -> bool:
        """Whether the merge keeps accumulators for an incremental one (the folds do)."""
        return self.method in methods_of_kind("fold")

    def config(self) -> MergeConfig:
        params = self.params if self.warm_start is None else self.params | {"warm_start": self.warm_start.coefficients}
        return MergeConfig(base=self.base.path, method=self.method, params=params, seed=self.seed,
                           experts=[ExpertRef(path=e.path, name=e.ref.name) for e in self.experts],
                           calibration=self.calibration)

    def warm_started(self, start: WarmStart, epochs: int) -> MergeJob:
        """This calibration, started from START's coefficients and trained EPOCHS epochs (params.keep_epochs past
        them dropped)."""
        params = self.params | {"epochs": epochs}
        if "keep_epochs" in params:
            params["keep_epochs"] = [epoch for epoch in params["keep_epochs"] if epoch <= epochs]
        return self.model_copy(update={"params": params, "warm_start": start})

    def extended(self, expert: LocalCheckpoint) -> MergeJob:
        return self.model_copy(update={"experts": [*self.experts, expert]})

    @property
    def resources(self) -> dict[str, float]:
        """The Dask worker resources the merge needs: a GPU when its calibration asks for a cuda device."""
        device = str(self.params.get("device", "auto"))
        return {GPU: 1} if is_calibrated(self.method) and device.startswith("cuda") else {}

    def fetched_here(self, data_there: Path, data_here: Path) -> MergeJob:
        """This merge with its base and experts fetched to this machine's cache (a local folder stays as it is), and
        its calibration files that lie in the evaluation data's copy DATA_THERE (where the job was made) read from
        this machine's copy DATA_HERE: how a task on any Dask worker gets the job's inputs."""
        calibration = {name: data_here / path.relative_to(data_there) if path.is_relative_to(data_there) else path
                       for name, path in self.calibration.items()}
        return self.model_copy(update={"base": local_copy(self.base.ref),
                                       "experts": [local_copy(e.ref) for e in self.experts],
                                       "calibration": calibration})


def merged_coefficients(merge_key: str, s3_uri: str) -> tuple[Path | None, str]:
    """The coefficients.json of the calibrated merge MERGE_KEY, and where it came from: that merge's output folder
    while STATE/work still has it, else a copy of the file from the merged model's folder in the store (S3_URI),
    verified against its manifest and kept under work/coefficients/MERGE_KEY. None and why when neither has it (an
    unreachable store included: a warm start is not worth failing a run for). The folder used is held."""
    settings = Settings.from_env()
    local = merge_folder(merge_key)
    if (local / "model" / COEFFICIENTS_FILE).is_file():
        hold_folder(local)
        return local / "model" / COEFFICIENTS_FILE, "the work cache"
    copy = work_folder(settings, "coefficients", merge_key)
    hold_folder(copy)
    if (copy / COEFFICIENTS_FILE).is_file():
        return copy / COEFFICIENTS_FILE, s3_uri
    try:
        manifest = read_manifest(s3_uri, settings=settings)
        if COEFFICIENTS_FILE not in manifest.files:
            return None, f"neither the work cache nor {s3_uri} has {COEFFICIENTS_FILE}"
        coefficients = read_json_file(s3_uri, COEFFICIENTS_FILE, manifest, settings=settings)
    except StorageError as exc:
        return None, f"not in the work cache, and the store did not give it: {exc}"
    copy.mkdir(parents=True, exist_ok=True)
    partial = copy / f".{COEFFICIENTS_FILE}.{os.getpid()}"
    partial.write_text(json.dumps(coefficients))
    os.replace(partial, copy / COEFFICIENTS_FILE)
    log.info("coefficients of merge %s fetched from %s", merge_key[:12], s3_uri)
    return copy / COEFFICIENTS_FILE, s3_uri


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
    """The S3 URI the merged model now has (the first upload's, when this merge was uploaded before), stored as an
    MLflow model in place (infra/mlflow_model.py); the local merged folder is left as the merge wrote it."""
    with tempfile.TemporaryDirectory(prefix="mergeplan-mlmodel-") as staging:
        manifest = upload_expert(upload.model.path, upload.s3_uri, settings=Settings.from_env(),
                                 extra_files=mlflow_model_files(upload.model.path, staging))
    log.info("merged model %s in %s (manifest sha256 %s)", upload.model.key[:12], upload.s3_uri, manifest.sha256)
    return upload.s3_uri
