"""`merge-pipeline`: one run end to end. Resolve and download the experts, merge (keeping the accumulators for
later incremental runs), evaluate, refit the law, decide, log to one MLflow run, upload and register the model.

With law.prefix_points, the first k experts are also merged for each such k (nested MLflow runs), so that the
law has points to fit from the first run on.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.outcome import Outcome, StageClock, conclude, eval_job, job_params, score_metrics
from flows.pipeline_config import PipelineConfig
from infra.registry import check_reachable
from infra.settings import Settings
from merging.calibration import CALIBRATED_METHODS
from tasks.caching import content_hash, fresh
from tasks.evaluate import evaluate_merged
from tasks.fetch import (
    CheckpointRef,
    LocalCheckpoint,
    base_ref,
    data_ref,
    fetch_checkpoint,
    registered_experts,
    stored_experts,
)
from tasks.merge import MergeJob, merge_full
from tasks.tracking import (
    BASE_TAG,
    FLOW_TAG,
    MERGE_KEY_TAG,
    METHOD_TAG,
    PARAMS_KEY_TAG,
    NestedRun,
    log_nested_runs,
    tracked_run,
)

FLOW_NAME = "merge-pipeline"


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


def fetch_data(config: PipelineConfig, settings: Settings) -> LocalCheckpoint:
    """The evaluation data, local or from the store."""
    ref = data_ref(config.data, settings)
    return fresh(fetch_checkpoint, ref)(ref)


def fetch_many(refs: list[CheckpointRef]) -> list[LocalCheckpoint]:
    """Local copies, downloaded in parallel."""
    return [future.result() for future in [fresh(fetch_checkpoint, ref).submit(ref) for ref in refs]]


def run_tags(config: PipelineConfig, flow_name: str) -> dict[str, str]:
    return {FLOW_TAG: flow_name, METHOD_TAG: config.method, BASE_TAG: config.base.name,
            PARAMS_KEY_TAG: content_hash(config.method_identity())}


def calibration_files(config: PipelineConfig, experts: list[LocalCheckpoint], data: LocalCheckpoint
                      ) -> dict[str, Path]:
    """The calibration samples of each of EXPERTS (calibrated methods only): as configured, or else its domain's
    calib split in the evaluation data. Configured names of experts not in this merge are left out: the set of
    registered experts changes from run to run."""
    if config.method not in CALIBRATED_METHODS:
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


def measure_prefixes(run_id: str, job: MergeJob, data: LocalCheckpoint, config: PipelineConfig) -> None:
    """Nested runs for the first k experts, k in law.prefix_points below the full count: points for the law."""
    ks = [k for k in config.law.prefix_points if k < len(job.experts)]
    prefixes = [merge_job(config, job.base, job.experts[:k], data) for k in ks]
    merged = [future.result() for future in [fresh(merge_full, job).submit(job) for job in prefixes]]
    scores = [future.result() for future in evaluate_merged.map([eval_job(m, data, config) for m in merged])]
    runs = [NestedRun(name=f"k={len(prefix.experts)}", params=job_params(prefix, data),
                      metrics=score_metrics(score, len(prefix.experts)), tags={MERGE_KEY_TAG: model.key})
            for prefix, model, score in zip(prefixes, merged, scores, strict=True)]
    if runs:
        log_nested_runs(run_id, config.experiment_name, run_tags(config, FLOW_NAME), runs)


@flow(name=FLOW_NAME)
def merge_pipeline(config: PipelineConfig) -> Outcome:
    settings = recording_settings()
    clock = StageClock()
    base = pipeline_base(config, settings)
    experts = resolve_experts(config, settings)
    with tracked_run(config.experiment_name, f"{config.method} k={len(experts)}",
                     run_tags(config, FLOW_NAME)) as run_id:
        local_base, *local_experts = fetch_many([base, *experts])
        data = fetch_data(config, settings)
        clock.lap("fetch")
        job = merge_job(config, local_base, local_experts, data)
        measure_prefixes(run_id, job, data, config)
        clock.lap("prefixes")
        merged = fresh(merge_full, job)(job)
        clock.lap("merge")
        return conclude(run_id, job, merged, data, config, clock, settings)
