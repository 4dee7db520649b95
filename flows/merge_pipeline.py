"""`merge-pipeline`: one run end to end. Resolve and download the experts, merge (keeping the accumulators for
later incremental runs), evaluate, refit the law, decide, log to one MLflow run, upload and register the model.

With law.prefix_points, the first k experts are also merged for each such k (nested MLflow runs), so that the
law has points to fit from the first run on.
"""

from __future__ import annotations

from prefect import flow

from flows.conclusion import Outcome, conclude, job_params, score_metrics
from flows.inputs import fetch_data, fetch_many, merge_job, run_tags, start_flow
from flows.pipeline_config import PipelineConfig
from flows.runtime import needing
from tasks.caching import fresh
from tasks.evaluate import MergeAndEvaluate, merge_and_evaluate
from tasks.fetch import LocalCheckpoint
from tasks.merge import MergeJob, merge_full
from tasks.tracking import MERGE_KEY_TAG, NestedRun, log_nested_runs, tracked_run

FLOW_NAME = "merge-pipeline"


def measure_prefixes(run_id: str, job: MergeJob, data: LocalCheckpoint, config: PipelineConfig) -> None:
    """Nested runs for the first k experts, k in law.prefix_points below the full count: points for the law. Each
    is merged and evaluated on one worker (on a GPU worker when its calibration asks for cuda)."""
    ks = [k for k in config.law.prefix_points if k < len(job.experts)]
    prefixes = [MergeAndEvaluate(merge=merge_job(config, job.base, job.experts[:k], data), data=data,
                                 evaluation=config.eval.model_dump(mode="json")) for k in ks]
    futures = []
    for prefix in prefixes:
        with needing(prefix.merge.resources):
            futures.append(merge_and_evaluate.submit(prefix))
    measured = [future.result() for future in futures]
    runs = [NestedRun(name=f"k={prefix.k}", params=job_params(prefix.merge, data),
                      metrics=score_metrics(result.scores, prefix.k), tags={MERGE_KEY_TAG: result.model.key})
            for prefix, result in zip(prefixes, measured, strict=True)]
    if runs:
        log_nested_runs(run_id, config.experiment_name, run_tags(config, FLOW_NAME), runs)


@flow(name=FLOW_NAME)
def merge_pipeline(config: PipelineConfig) -> Outcome:
    settings, clock, base, experts = start_flow(config)
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
