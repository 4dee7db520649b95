"""What the reviewer reads on a merged version: the true lineage of experts named by S3 URI (the demo's way),
and a champion never worse than the base."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pipeline_support import pipeline_config, store_expert

from flows.merge_pipeline import merge_pipeline
from flows.runtime import configured
from infra.registry import CHAMPION, merged_model_name
from infra.s3 import expert_uri, upload_expert
from tasks.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING, REVIEW_VIEW_TAG

BASE = "crown-base"  # a registry of its own: no champion yet


@pytest.fixture(scope="module")
def named_by_uri(pipeline_env, tiny_zoo) -> dict[str, str]:
    """Three experts named by S3 URI: one registered where it lies, one registered elsewhere (the same files under
    another folder), one never registered. Returns the registered versions by name."""
    upload_expert(tiny_zoo / "base", f"s3://{pipeline_env.bucket}/bases/{BASE}", settings=pipeline_env)
    algebra = store_expert(tiny_zoo, "algebra", pipeline_env, base=BASE)
    biology = store_expert(tiny_zoo, "biology", pipeline_env, base=BASE)
    upload_expert(tiny_zoo / "experts" / "biology", expert_uri(BASE, "bio-copy", pipeline_env), settings=pipeline_env)
    store_expert(tiny_zoo, "analysis", pipeline_env, base=BASE, register=False)
    return {"algebra": algebra.version, "bio-copy": biology.version}


def run(tiny_zoo, settings, **overrides):
    experts = [expert_uri(BASE, name, settings) for name in ("algebra", "bio-copy", "analysis")]
    config = pipeline_config(tiny_zoo, base={"name": BASE}, experts=experts, **overrides)
    return configured(merge_pipeline, config.runner, settings)(config)


def test_lineage_finds_each_registered_version_by_its_manifest_however_the_expert_is_named(
        pipeline_env, tiny_zoo, named_by_uri):
    outcome = run(tiny_zoo, pipeline_env, params={"lambda": 1.0})
    version = MlflowClient(pipeline_env.mlflow_tracking_uri).get_model_version(merged_model_name(BASE), outcome.version)
    tags = version.tags
    assert (tags["expert.algebra.model"], tags["expert.algebra.version"]) == (f"expert.{BASE}.algebra",
                                                                            named_by_uri["algebra"])
    assert (tags["expert.bio-copy.model"], tags["expert.bio-copy.version"]) == (f"expert.{BASE}.biology",
                                                                              named_by_uri["bio-copy"])
    assert tags["expert.analysis.version"] == "unregistered"
    assert f"`mergeplan expert register {expert_uri(BASE, 'analysis', pipeline_env)} --domain DOMAIN --base " \
           f"{BASE}`" in tags["expert.analysis.unregistered"]
    card = version.description
    assert f"| algebra | expert.{BASE}.algebra | {named_by_uri['algebra']} |" in card
    assert f"| bio-copy | expert.{BASE}.biology | {named_by_uri['bio-copy']} |" in card
    assert f"| analysis | unregistered: no version of expert.{BASE}.* has manifest sha256 " in card


def test_the_base_is_the_zeroth_champion(pipeline_env, tiny_zoo, named_by_uri):
    client = MlflowClient(pipeline_env.mlflow_tracking_uri)
    worse = run(tiny_zoo, pipeline_env, params={"lambda": 1.0})  # overshoots: worse than not merging
    run_data = client.get_run(worse.run_id).data
    assert not worse.champion and run_data.metrics["vs_base.macro_ce"] > 0
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(merged_model_name(BASE), CHAMPION)
    note = run_data.tags["mlflow.note.content"]
    gap = run_data.metrics["vs_base.macro_ce"]
    assert f"(base {run_data.metrics['base_macro_ce']:.4f}, no champion yet); version {worse.version}, not crowned: " \
           f"macro CE {gap:+.4f} against the base (must beat it by more than 0); the base stays the champion; " \
           "worse than the base on " in note
    named = note.split("worse than the base on ")[1].split("; ")[0].split(", ")
    card = client.get_model_version(merged_model_name(BASE), worse.version).description
    domains = sum(1 for metric in run_data.metrics if metric.startswith("ce."))
    listed = card.split(f"Worse than the base on {len(named)} of {domains} domains: ")[1].split("\n")[0]
    assert [entry.split(" (+")[0] for entry in listed.split(", ")] == named

    first = run(tiny_zoo, pipeline_env)  # λ 0.2 beats the base
    assert first.champion
    assert client.get_model_version_by_alias(merged_model_name(BASE), CHAMPION).version == first.version
    note = client.get_run(first.run_id).data.tags["mlflow.note.content"]
    assert f"version {first.version}, new champion: macro CE -" in note and "against the base" in note

    # beats the base by 0.02, the champion by less than the margin
    kept = run(tiny_zoo, pipeline_env, params={"lambda": 0.15}, champion={"margin": 0.01})
    assert not kept.champion
    assert client.get_model_version_by_alias(merged_model_name(BASE), CHAMPION).version == first.version
    note = client.get_run(kept.run_id).data.tags["mlflow.note.content"]
    assert f"version {kept.version}, champion v{first.version} kept: macro CE " in note
    assert "(must beat it by more than 0.01)" in note

    experiment = client.get_experiment(client.get_run(kept.run_id).info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING
    view = json.loads(experiment.tags[REVIEW_VIEW_TAG])  # the run list the links open: best macro CE first
    assert view["orderByKey"] == "metrics.`macro_ce`" and view["orderByAsc"] is True
    assert {"metrics.`experts`", "tags.`mergeplan.method`", "tags.`mergeplan.decision`"} <= set(view["selectedColumns"])
    assert kept.run_page.endswith(f"/#/experiments/{experiment.experiment_id}/runs/{kept.run_id}"
                                  "?workflowType=machine_learning")
