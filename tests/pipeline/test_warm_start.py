"""A new expert joins a calibrated head warm: calibration starts from the head's coefficients (from the store when
the work cache lost them), keyed on the head's merge, not on where its file lies; a new version of a member's
domain calibrates every expert cold, and the run says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mlflow import MlflowClient
from pipeline_support import pipeline_config, store_expert

from flows.merge_pipeline import merge_pipeline
from flows.on_new_expert import CALIBRATION_REASON_TAG, CALIBRATION_START_TAG, on_new_expert
from flows.runtime import configured
from infra.registry import register_expert
from infra.s3 import expert_uri, upload_expert
from tasks.fetch import CheckpointRef, LocalCheckpoint
from tasks.merge import MergeJob, WarmStart, merge_folder, merged_coefficients

WARM_BASE = "warm-base"  # a base of its own: its own head, which the other pipeline tests do not move
FAST = {"samples_per_expert": 2, "grad_accumulation": 2, "epochs": 1, "gamma": 0.8}


def test_a_warm_start_is_keyed_on_the_heads_merge_not_on_where_its_coefficients_lie(tmp_path):
    local = LocalCheckpoint(ref=CheckpointRef(name="base", domain="base", uri=str(tmp_path), sha256="0" * 64),
                            path=tmp_path)
    job = MergeJob(base=local, experts=[local], method="expert_merging", params=FAST, seed=0)
    here, there, other = (job.warm_started(WarmStart(coefficients=tmp_path / name, merge_key=key), epochs=1)
                          for name, key in (("a.json", "head-1"), ("b.json", "head-1"), ("a.json", "head-2")))
    assert here.cache_key == there.cache_key and len({here.cache_key, other.cache_key, job.cache_key}) == 3
    assert there.config().params["warm_start"] == tmp_path / "b.json"


def test_a_new_expert_joins_a_calibrated_head_warm_and_a_replacement_starts_cold(pipeline_env, tiny_zoo):
    upload_expert(tiny_zoo / "base", f"s3://{pipeline_env.bucket}/bases/{WARM_BASE}", settings=pipeline_env)
    for domain in ("algebra", "analysis"):
        store_expert(tiny_zoo, domain, pipeline_env, base=WARM_BASE)
    config = pipeline_config(tiny_zoo, base={"name": WARM_BASE}, method="expert_merging", params=FAST)
    head = configured(merge_pipeline, config.runner, pipeline_env)(config)
    coefficients = json.loads((head.model_path / "coefficients.json").read_text())
    assert head.model_path.parent == merge_folder(head.merge_key) or head.model_path.parent.name == head.merge_key
    shutil.rmtree(head.model_path.parent)  # the work cache lost the head: its coefficients come from the store
    add = configured(on_new_expert, config.runner, pipeline_env)
    client = MlflowClient(pipeline_env.mlflow_tracking_uri)

    biology = store_expert(tiny_zoo, "biology", pipeline_env, base=WARM_BASE)
    warm = add(config, biology.s3_uri, biology.sha256, biology.version, "biology", WARM_BASE)
    report = json.loads((warm.model_path / "calibration.json").read_text())
    assert warm.experts == ["algebra", "analysis", "biology"] and report["warm_start"]["new_experts"] == ["biology"]
    assert json.loads(Path(report["warm_start"]["from"]).read_text()) == coefficients
    assert report["params"]["epochs"] == config.warm_start.epochs
    tags = client.get_run(warm.run_id).data.tags
    assert tags[CALIBRATION_START_TAG] == "warm" and head.merged_uri in tags[CALIBRATION_REASON_TAG]
    assert merged_coefficients(warm.merge_key, warm.merged_uri)[1] == "the work cache"  # the next one reads it here

    # a new version of algebra (other weights, in a folder of its own) changes an expert the coefficients were for
    uri = expert_uri(WARM_BASE, "algebra-v2", pipeline_env)
    upload_expert(tiny_zoo / "experts" / "geometry", uri, settings=pipeline_env)
    replacement = register_expert(uri, "algebra", WARM_BASE, settings=pipeline_env)
    cold = add(config, replacement.s3_uri, replacement.sha256, replacement.version, "algebra", WARM_BASE)
    assert cold.experts == ["analysis", "biology", "algebra"]
    assert json.loads((cold.model_path / "calibration.json").read_text())["warm_start"] is None
    tags = client.get_run(cold.run_id).data.tags
    assert tags[CALIBRATION_START_TAG] == "cold" and "replaces" in tags[CALIBRATION_REASON_TAG]
