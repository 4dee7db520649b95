"""What the flows share before they merge: settings once MLflow answers, the base and the experts to merge, local
copies of them and of the evaluation data, the merge job with its calibration files, and the tags of a run."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from flows.pipeline_config import PipelineConfig
from infra.registry import check_reachable
from infra.settings import Settings
from merging.methods.registry import is_calibrated
from tasks.caching import content_hash, fresh
from tasks.fetch import (
    CheckpointRef,
    LocalCheckpoint,
    base_ref,
    data_ref,
    fetch_checkpoint,
    registered_experts,
    stored_experts,
)
from tasks.merge import MergeJob
from tasks.stages import StageClock
from tasks.tracking import BASE_TAG, FLOW_TAG, METHOD_TAG, PARAMS_KEY_TAG


def recording_settings() -> Settings:
    """The settings of this process, once MLflow answered: a pipeline that cannot record its results does not
    start (no download, no merge)."""
    settings = Settings.from_env()
    check_reachable(settings.mlflow_tracking_uri, settings.mlflow_timeout_s)
    return settings


def pipeline_base(config: PipelineConfig, settings: Settings) -> CheckpointRef:
    return base_ref(config.base.name, config.base.uri, config.base.path, settings)


def resolve_experts(config: PipelineConfig, settings: Settings) -> list[CheckpointRef]:
    if config.experts == "all":
        return registered_experts(config.base.name, settings)
    return stored_experts(config.experts, settings)


class FlowStart(NamedTuple):
    """What a flow over all of the pipeline's experts has before its MLflow run opens: nothing is downloaded yet."""

    settings: Settings
    clock: StageClock
    base: CheckpointRef
    experts: list[CheckpointRef]


def start_flow(config: PipelineConfig) -> FlowStart:
    """The settings (MLflow answered), the flow's clock, started, then the base and the experts it merges."""
    settings = recording_settings()
    clock = StageClock()
    return FlowStart(settings, clock, pipeline_base(config, settings), resolve_experts(config, settings))


def fetch_one(ref: CheckpointRef) -> LocalCheckpoint:
    """A local copy of REF, named as REF names it: the fetch is cached on content, so a cached copy may have been
    fetched for another folder (or registered version) with the same files."""
    return fresh(fetch_checkpoint, ref)(ref).model_copy(update={"ref": ref})


def fetch_data(config: PipelineConfig, settings: Settings) -> LocalCheckpoint:
    """The evaluation data, local or from the store."""
    return fetch_one(data_ref(config.data, settings))


def fetch_many(refs: list[CheckpointRef]) -> list[LocalCheckpoint]:
    """Local copies, downloaded in parallel, each named as its ref names it (see fetch_one)."""
    futures = [fresh(fetch_checkpoint, ref).submit(ref) for ref in refs]
    return [future.result().model_copy(update={"ref": ref}) for future, ref in zip(futures, refs, strict=True)]


def run_tags(config: PipelineConfig, flow_name: str) -> dict[str, str]:
    return {FLOW_TAG: flow_name, METHOD_TAG: config.method, BASE_TAG: config.base.name,
            PARAMS_KEY_TAG: content_hash(config.method_identity())}


def calibration_files(config: PipelineConfig, experts: list[LocalCheckpoint], data: LocalCheckpoint
                      ) -> dict[str, Path]:
    """The calibration samples of each of EXPERTS (calibrated methods only): as configured, or else its domain's
    calib split in the evaluation data. Configured names of experts not in this merge are left out: the set of
    registered experts changes from run to run."""
    if not is_calibrated(config.method):
        return {}
    names = {e.ref.name for e in experts}
    if config.calibration:
        return {name: path for name, path in config.calibration.items() if name in names}
    files = {e.ref.name: data.path / e.ref.domain / "calib.jsonl" for e in experts}
    return {name: path for name, path in files.items() if path.is_file()}


def merge_job(config: PipelineConfig, base: LocalCheckpoint, experts: list[LocalCheckpoint],
              data: LocalCheckpoint) -> MergeJob:
    return MergeJob(base=base, experts=experts, method=config.method, params=config.params, seed=config.seed,
                    calibration=calibration_files(config, experts, data))
