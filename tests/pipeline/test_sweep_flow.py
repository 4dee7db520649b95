"""scaling-sweep on a 2-worker Dask LocalCluster, against the real S3, MLflow and Prefect servers."""

from __future__ import annotations

import os
from unittest import mock

import yaml
from mlflow import MlflowClient
from pipeline_support import BASE, PIPELINE_DOMAINS, pipeline_config

from flows.pipeline_config import RunnerSettings
from flows.runtime import configured
from flows.scaling_sweep import scaling_sweep
from infra.s3 import expert_uri

METHODS = ["average", "task_arithmetic"]
# balanced design over M = 3: k = 1 and k = 2 have 3 windows each, k = 3 one subset
MERGES_PER_METHOD = 7


def sweep_config(tiny_zoo, settings, **overrides):
    return pipeline_config(
        tiny_zoo, experts=[expert_uri(BASE, domain, settings) for domain in PIPELINE_DOMAINS],
        sweep={"methods": METHODS, "design": "balanced", "eval_examples": 4}, **overrides)


def test_sweep_fans_out_on_dask_and_logs_a_run_per_merge(pipeline_env, tiny_zoo):
    config = sweep_config(tiny_zoo, pipeline_env, runner={"kind": "dask", "n_workers": 2})
    outcome = configured(scaling_sweep, config.runner, pipeline_env)(config)
    assert outcome.merges == MERGES_PER_METHOD * len(METHODS)
    assert set(outcome.plan) == {*METHODS, "recommended"} and all(outcome.plan.values())
    assert outcome.plan["recommended"].split(":")[0] in (*METHODS, "no method follows the law (R² ≥ 0.9), ")
    client = MlflowClient(pipeline_env.mlflow_tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.data.tags["mergeplan.flow"] == "scaling-sweep" and run.data.tags["mergeplan.decision"] == "plan"
    assert {"law.average.floor", "law.task_arithmetic.r_squared"} <= set(run.data.metrics)
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{outcome.run_id}'",
                                max_results=1000)
    assert len(nested) == outcome.merges
    assert {r.data.params["method"] for r in nested} == set(METHODS)
    assert all(r.data.metrics["macro_ce"] > 0 for r in nested)
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"sweep.parquet", "plan.md", "fit"} <= artifacts
    assert os.path.isfile(outcome.table)


def test_mergeplan_run_runs_the_sweep_now_and_prints_the_plan(pipeline_env, prefect_api_url, tiny_zoo, tmp_path,
                                                              run_cli):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(sweep_config(tiny_zoo, pipeline_env).as_parameters()))
    with mock.patch.dict(os.environ, {"MERGEPLAN_PREFECT_API_URL": prefect_api_url}):
        status, out, err = run_cli("run", path, "--flow", "scaling-sweep")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"swept {MERGES_PER_METHOD * len(METHODS)} merges; table ")
    assert [line.split(":")[0] for line in lines[1:4]] == [*METHODS, "recommended"]
    assert lines[4].startswith("MLflow run ")

