"""A registration whose event never became a flow run (Prefect down, receiver stopped) is found and merged by
`reconcile`, once: a second reconcile finds nothing."""

from __future__ import annotations

from mlflow import MlflowClient
from pipeline_support import pipeline_config, store_expert

from flows.merge_pipeline import merge_pipeline
from flows.reconcile import reconcile, untaken_experts
from flows.runtime import configured


def test_a_registration_no_run_took_is_merged_by_reconcile_once(pipeline_env, tiny_zoo):
    config = pipeline_config(tiny_zoo)
    champion = configured(merge_pipeline, config.runner, pipeline_env)(config)  # cached when made before
    held = {expert.s3_uri for expert in untaken_experts(config, pipeline_env)}
    assert not held & {f"s3://{pipeline_env.bucket}/experts/zoo-base/{name}" for name in champion.experts}

    # registered while nothing listens: no webhook receiver, no trigger, so no run
    lost = store_expert(tiny_zoo, "geometry", pipeline_env)
    assert lost.s3_uri in {expert.s3_uri for expert in untaken_experts(config, pipeline_env)}

    outcomes = configured(reconcile, config.runner, pipeline_env)(config)
    geometry = [outcome for outcome in outcomes if "geometry" in outcome.experts]
    assert len(geometry) >= 1 and geometry[-1].incremental
    run = MlflowClient(pipeline_env.mlflow_tracking_uri).get_run(geometry[-1].run_id)
    assert run.data.tags["mergeplan.new_expert"] == lost.s3_uri
    assert run.data.tags["mergeplan.new_expert_sha256"] == lost.sha256
    assert run.data.tags["mergeplan.decision"] in ("continue", "stop", "uncertain", "law_fails")
    assert untaken_experts(config, pipeline_env) == []
    assert configured(reconcile, config.runner, pipeline_env)(config) == []  # nothing is merged twice
