"""A registration whose event never became a flow run (Prefect down, receiver stopped) is found and merged by
`reconcile`, once: a second reconcile finds nothing. A run takes every untaken registration, its own among them,
so experts join the head in registration order, each once."""

from __future__ import annotations

from mlflow import MlflowClient
from pipeline_support import BASE, pipeline_config, store_expert

from flows.merge_pipeline import merge_pipeline
from flows.on_new_expert import on_new_expert
from flows.reconcile import reconcile
from flows.runtime import configured
from infra.registry import head_version
from tasks.fetch import merged_experts
from tasks.pipeline_state import untaken_experts


def test_a_registration_no_run_took_is_merged_by_reconcile_once(pipeline_env, tiny_zoo):
    config = pipeline_config(tiny_zoo)
    champion = configured(merge_pipeline, config.runner, pipeline_env)(config)  # cached when made before
    held = {expert.s3_uri for expert in untaken_experts(config.experiment_name, config.base.name, pipeline_env)}
    assert not held & {f"s3://{pipeline_env.bucket}/experts/zoo-base/{name}" for name in champion.experts}

    # registered while nothing listens: no webhook receiver, no trigger, so no run
    lost = store_expert(tiny_zoo, "geometry", pipeline_env)
    untaken = untaken_experts(config.experiment_name, config.base.name, pipeline_env)
    assert lost.s3_uri in {expert.s3_uri for expert in untaken}

    outcomes = configured(reconcile, config.runner, pipeline_env)(config)
    geometry = [outcome for outcome in outcomes if "geometry" in outcome.experts]
    assert len(geometry) >= 1 and geometry[-1].incremental
    run = MlflowClient(pipeline_env.mlflow_tracking_uri).get_run(geometry[-1].run_id)
    assert run.data.tags["mergeplan.new_expert"] == lost.s3_uri
    assert run.data.tags["mergeplan.new_expert_sha256"] == lost.sha256
    assert run.data.tags["mergeplan.decision"] in ("continue", "stop", "uncertain", "law_fails")
    assert untaken_experts(config.experiment_name, config.base.name, pipeline_env) == []
    assert configured(reconcile, config.runner, pipeline_env)(config) == []  # nothing is merged twice


def test_a_run_takes_every_untaken_registration_in_order_and_each_expert_once(pipeline_env, tiny_zoo):
    config = pipeline_config(tiny_zoo)
    configured(merge_pipeline, config.runner, pipeline_env)(config)
    configured(reconcile, config.runner, pipeline_env)(config)  # whatever earlier tests left untaken
    registered = [store_expert(tiny_zoo, domain, pipeline_env) for domain in ("number_theory", "code", "physics")]
    add = configured(on_new_expert, config.runner, pipeline_env)

    # the middle registration's event starts a run first (runs waiting for the deployment's slot start in any order)
    middle = registered[1]
    outcome = add(config, middle.s3_uri, middle.sha256, middle.version, "code", BASE)
    client = MlflowClient(pipeline_env.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment_name).experiment_id
    runs = client.search_runs([experiment], "tags.`mergeplan.flow` = 'on-new-expert'", order_by=["start_time ASC"])
    uris = [r.s3_uri for r in registered]
    assert [r.data.tags["mergeplan.new_expert"] for r in runs if r.data.tags["mergeplan.new_expert"] in uris] == uris
    assert outcome.experts[-2:] == ["number_theory", "code"] and outcome.incremental  # its own result
    head = head_version(BASE, settings=pipeline_env)
    assert [e.domain for e in merged_experts(head)] == [*outcome.experts, "physics"]  # the later one joined too

    # the other two events, and the middle one delivered twice: each expert is merged once
    for expert, domain in zip(registered, ("number_theory", "code", "physics"), strict=True):
        assert add(config, expert.s3_uri, expert.sha256, expert.version, domain, BASE) is None
    assert len(client.search_runs([experiment], "tags.`mergeplan.flow` = 'on-new-expert'")) == len(runs)
