"""merge-pipeline end to end against real servers: moto S3, an MLflow server, Prefect's test harness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from mlflow import MlflowClient
from mlops_support import ACCESS_KEY, SECRET_KEY, WEBHOOK_SECRET, free_port
from pipeline_support import BASE, PIPELINE_DOMAINS, pipeline_config, store_expert
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

from flows.merge_pipeline import merge_pipeline
from flows.on_new_expert import on_new_expert
from flows.runtime import configured
from infra.errors import RegistryError
from infra.registry import CHAMPION, merged_model_name
from infra.s3 import s3_client
from merging import MergeConfig, merge
from merging.config import ExpertRef
from merging.io.checkpoint import CheckpointReader
from tasks.caching import content_hash


def task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run.state.name for run in runs}


def test_pipeline_runs_end_to_end_and_a_second_run_recomputes_nothing(pipeline_env, tiny_zoo):
    config = pipeline_config(tiny_zoo, law={"min_gain": 0.001, "prefix_points": [1, 2]})
    pipeline = configured(merge_pipeline, config.runner, pipeline_env)
    state = pipeline(config, return_state=True)
    first = state.result()
    assert first.experts == PIPELINE_DOMAINS
    # k = 1, 2 (nested) and 3: three points, so the law is fitted and a decision is made on it.
    assert first.decision.law is not None and first.decision.predicted_gain is not None
    # Three points fit the three parameters exactly: no band, so never a confident stop.
    assert first.decision.action in ("continue", "uncertain", "law_fails") and first.champion
    client = MlflowClient(pipeline_env.mlflow_tracking_uri)
    run = client.get_run(first.run_id)
    assert run.data.tags["mergeplan.decision"] == first.decision.action
    assert run.data.metrics["macro_ce"] == pytest.approx(first.macro_ce)
    assert run.data.metrics["experts"] == 3 and "ce.algebra" in run.data.metrics
    assert run.data.params["expert.biology.sha256"] and run.data.params["method"] == "task_arithmetic"
    assert run.data.metrics["stage.merge.compute_seconds"] > 0
    artifacts = {a.path for a in client.list_artifacts(first.run_id)} | {
        a.path for a in client.list_artifacts(first.run_id, "law")}
    assert {"plan.md", "merge_config.yaml", "law/law.png"} <= artifacts and "model" not in artifacts  # S3 only
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{first.run_id}'")
    assert sorted(r.data.metrics["experts"] for r in nested) == [1, 2]
    champion = client.get_model_version_by_alias(merged_model_name(BASE), CHAMPION)
    assert champion.source == first.merged_uri and first.merged_uri.startswith(f"s3://{pipeline_env.bucket}/merged/")
    # Read from the store directly: MLflow's own download hands out presigned URLs, which carry the key id.
    plan_key = f"mlflow/{run.info.artifact_uri.removeprefix('mlflow-artifacts:/')}/plan.md"
    plan = s3_client(pipeline_env).get_object(Bucket=pipeline_env.bucket, Key=plan_key)["Body"].read().decode()
    assert plan.startswith("# Plan for task_arithmetic")
    for value in [*run.data.params.values(), *run.data.tags.values(), plan]:
        assert ACCESS_KEY not in value and SECRET_KEY not in value and WEBHOOK_SECRET not in value

    again = pipeline(config, return_state=True)
    second = again.result()
    states = task_states(again.state_details.flow_run_id)
    computed = {name: s for name, s in states.items() if name.split("-")[0] in ("fetch", "merge", "evaluate",
                                                                                "upload", "fit", "add")}
    assert computed and set(computed.values()) == {"Cached"}, computed
    assert second.macro_ce == first.macro_ce and second.merged_uri == first.merged_uri
    assert second.version == first.version and second.run_id != first.run_id


def test_unreachable_mlflow_fails_before_any_download(pipeline_env, tiny_zoo):
    config = pipeline_config(tiny_zoo)
    down = {"MERGEPLAN_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    with (mock.patch.dict(os.environ, down), mock.patch("tasks.fetch.download_folder") as download,
          pytest.raises(RegistryError, match="unreachable")):
        configured(merge_pipeline, config.runner, pipeline_env)(config)
    download.assert_not_called()


def test_evaluation_data_from_the_store_gives_the_same_scores(pipeline_env, tiny_zoo, run_cli):
    local = configured(merge_pipeline, pipeline_config(tiny_zoo).runner, pipeline_env)(pipeline_config(tiny_zoo))
    status, out, err = run_cli("data", "upload", tiny_zoo / "data")
    uri = f"s3://{pipeline_env.bucket}/data"
    assert status == 0 and out.startswith(f"{uri} ("), err
    config = pipeline_config(tiny_zoo, data=uri)
    stored = configured(merge_pipeline, config.runner, pipeline_env)(config)
    assert stored.merge_key == local.merge_key and stored.macro_ce == local.macro_ce  # same model, same examples
    params = MlflowClient(pipeline_env.mlflow_tracking_uri).get_run(stored.run_id).data.params
    assert params["data"] == uri and (pipeline_env.cache_dir / "folders" / params["data.sha256"] / "algebra").is_dir()


def test_a_calibrated_method_learns_on_the_data_calib_split_and_logs_its_coefficients(pipeline_env, tiny_zoo):
    config = pipeline_config(tiny_zoo, method="expert_merging_pp", law={"min_gain": 0.001, "prefix_points": [2]},
                             params={"samples_per_expert": 2, "grad_accumulation": 2, "epochs": 1})
    outcome = configured(merge_pipeline, config.runner, pipeline_env)(config)
    assert outcome.experts == PIPELINE_DOMAINS and not outcome.incremental
    # no calibration: in the config, so each expert's samples are its domain's calib split of the data
    learned = json.loads((outcome.model_path / "calibration.json").read_text())
    assert learned["samples"] == dict.fromkeys(PIPELINE_DOMAINS, 2)
    client = MlflowClient(pipeline_env.mlflow_tracking_uri)
    logged = {a.path for a in client.list_artifacts(outcome.run_id, "coefficients")}
    assert {"coefficients/coefficients.png", "coefficients/calibration.json"} <= logged
    # gamma: auto (the default) held one of each expert's two samples out and chose the γ that scored best there
    choice, metrics = learned["gamma_choice"], client.get_run(outcome.run_id).data.metrics
    assert choice["held_out_samples"] == 3 and metrics["calibration.gamma"] == choice["chosen"]
    tried = {float(g): ce for g, ce in choice["held_out_ce"].items()}
    assert choice["chosen"] == min(tried, key=tried.get) and len(tried) == 3
    assert all(metrics[f"calibration.held_out_ce.gamma_{g}"] == ce for g, ce in choice["held_out_ce"].items())
    # init: auto (the default) scored each λ of the grid on those held-out samples and started from the best
    inits = {float(value): ce for value, ce in learned["init_choice"]["ce"].items()}
    assert metrics["calibration.init"] == learned["params"]["init"] == min(inits, key=inits.get) and len(inits) == 6
    assert all(metrics[f"calibration.ce.init_{value}"] == ce for value, ce in learned["init_choice"]["ce"].items())
    nested = client.search_runs([client.get_run(outcome.run_id).info.experiment_id],
                                f"tags.mlflow.parentRunId = '{outcome.run_id}'")
    assert [r.data.params["experts"] for r in nested] == ["algebra,analysis"]  # the prefix learns on its own two


def test_evaluation_data_missing_from_the_store_is_named_without_a_traceback(pipeline_env, prefect_api_url, tiny_zoo,
                                                                              tmp_path):
    path = tmp_path / "pipeline.yaml"
    config = pipeline_config(tiny_zoo, data=f"s3://{pipeline_env.bucket}/data/never-uploaded")
    path.write_text(yaml.safe_dump(config.as_parameters()))
    env = {**pipeline_env.as_env(), "MERGEPLAN_PREFECT_API_URL": prefect_api_url, "PATH": "/usr/bin:/bin",
           "PREFECT_HOME": str(tmp_path / "prefect"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "mergeplan.cli", "run", str(path)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 2, done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("error: ") and "data/never-uploaded/manifest.json: no such object" in last
    assert "mergeplan data upload" in last and "Traceback" not in done.stderr  # Prefect's log lines, one each
    assert "Retry 1/2" not in done.stderr  # a missing object is final: the task is not tried again


def test_uploading_a_folder_without_domains_as_data_is_refused(pipeline_env, tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    status, _, err = run_cli("data", "upload", tmp_path / "empty", f"s3://{pipeline_env.bucket}/data/empty")
    assert status == 2 and "no domain folders" in err and err.count("\n") == 1


def test_a_new_expert_is_merged_incrementally_into_the_champion(pipeline_env, tiny_zoo):
    config = pipeline_config(tiny_zoo)
    champion = configured(merge_pipeline, config.runner, pipeline_env)(config)  # cached when the test above ran
    added = store_expert(tiny_zoo, "chemistry", pipeline_env)
    outcome = configured(on_new_expert, config.runner, pipeline_env)(
        config, s3_uri=added.s3_uri, sha256=added.sha256, version=added.version, domain="chemistry", base=BASE)
    assert outcome.incremental and outcome.experts == [*champion.experts, "chemistry"]
    run = MlflowClient(pipeline_env.mlflow_tracking_uri).get_run(outcome.run_id)
    assert run.data.tags["mergeplan.decision"] == outcome.decision.action
    assert run.data.tags["mergeplan.flow"] == "on-new-expert" and run.data.metrics["experts"] == 4
    assert run.data.tags["mergeplan.incremental"] == "true"
    # The incremental merge equals a full merge of the same four experts.
    cache = pipeline_env.cache_dir / "folders"
    experts = [ExpertRef(path=cache / sha, name=name) for name, sha in zip(
        outcome.experts, [run.data.params[f"expert.{n}.sha256"] for n in outcome.experts], strict=True)]
    full = merge(MergeConfig(base=cache / run.data.params["base.sha256"], experts=experts, method=config.method,
                             params=config.params), pipeline_env.state_dir / "full-4")
    incremental, batch = CheckpointReader(outcome.model_path), CheckpointReader(full)
    assert max(float((incremental.read(n) - batch.read(n)).abs().max()) for n in batch.names()) < 1e-6


def test_a_reviewer_sees_lineage_scores_and_the_decision_in_mlflow_and_prefect(pipeline_env, tiny_zoo):
    configured(merge_pipeline, pipeline_config(tiny_zoo).runner, pipeline_env)(pipeline_config(tiny_zoo))  # a champion
    config = pipeline_config(tiny_zoo, params={"lambda": 0.15})  # a merge of its own: a new version
    state = configured(merge_pipeline, config.runner, pipeline_env)(config, return_state=True)
    outcome = state.result()
    client = MlflowClient(pipeline_env.mlflow_tracking_uri)
    run = client.get_run(outcome.run_id)
    version = client.get_model_version(merged_model_name(BASE), outcome.version)
    for name in outcome.experts:  # lineage: each expert's registered model, version and manifest sha256
        assert version.tags[f"expert.{name}.model"] == f"expert.{BASE}.{name}"
        assert version.tags[f"expert.{name}.sha256"] == run.data.params[f"expert.{name}.sha256"]
        assert version.tags[f"expert.{name}.version"].isdigit()
    assert version.tags["base.sha256"] == run.data.params["base.sha256"]
    # the champion history: the version it was compared with, on the version and on the run
    previous = version.tags["mergeplan.previous_champion"]
    assert previous == run.data.tags["mergeplan.previous_champion"] and previous != outcome.version
    base_ce, champion_ce = run.data.metrics["base_macro_ce"], client.get_run(
        client.get_model_version(merged_model_name(BASE), previous).run_id).data.metrics["macro_ce"]
    assert run.data.metrics["vs_champion.macro_ce"] == pytest.approx(outcome.macro_ce - champion_ce)
    assert run.data.metrics["vs_base.macro_ce"] == pytest.approx(outcome.macro_ce - base_ce) and base_ce > 0

    card = version.description  # the version's card
    assert card.startswith(f"# merged.{BASE} version {outcome.version}\n")
    assert (f"| **macro** | {outcome.macro_ce:.4f} | {base_ce:.4f} | {outcome.macro_ce - base_ce:+.4f} | "
            f"{champion_ce:.4f} | {outcome.macro_ce - champion_ce:+.4f} |") in card
    assert f"| algebra | expert.{BASE}.algebra | {version.tags['expert.algebra.version']} |" in card
    link = (f"{pipeline_env.mlflow_tracking_uri}/#/experiments/{run.info.experiment_id}/runs/{outcome.run_id}"
            "?workflowType=machine_learning")
    assert link in card and f"## Decision\n\n{outcome.decision.reason}" in card
    assert outcome.decision.reason.startswith(outcome.decision.action)
    note = run.data.tags["mlflow.note.content"]  # the run's description: one sentence with the numbers
    assert note.startswith(f"task_arithmetic of {len(outcome.experts)} experts: macro CE {outcome.macro_ce:.4f} "
                           f"(base {base_ce:.4f}, champion v{previous} {champion_ce:.4f}); version {outcome.version}")
    assert "\n" not in note and note.endswith(outcome.decision.reason)

    # the per-domain table artifact, read from the store (MLflow's own download hands out presigned URLs)
    store = s3_client(pipeline_env)
    artifacts_key = f"mlflow/{run.info.artifact_uri.removeprefix('mlflow-artifacts:/')}"

    def table(name):
        found = json.loads(store.get_object(Bucket=pipeline_env.bucket, Key=f"{artifacts_key}/{name}")["Body"].read())
        return dict(zip(found["columns"], zip(*found["data"], strict=True), strict=True))

    rows = table("per_domain.json")
    assert list(rows["domain"]) == sorted(m.removeprefix("ce.") for m in run.data.metrics if m.startswith("ce."))
    assert [round(ce, 6) for ce in rows["ce"]] == [round(run.data.metrics[f"ce.{d}"], 6) for d in rows["domain"]]

    # the experiment's methods side by side: two λ of task arithmetic, each under its own label
    methods = table("methods.json")
    points = set(zip(methods["method"], methods["k"], (round(ce, 6) for ce in methods["macro_ce"]), strict=True))
    mine = f"task_arithmetic #{content_hash(config.method_identity())[:6]}"
    assert (mine, len(outcome.experts), round(outcome.macro_ce, 6)) in points
    assert any(label != mine and ce == round(champion_ce, 6) for label, _, ce in points)
    assert store.head_object(Bucket=pipeline_env.bucket, Key=f"{artifacts_key}/methods/methods.png")["ContentLength"]

    # the same summary as the Prefect flow run's markdown artifact
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    [artifact] = [a for a in artifacts if a.key == f"merge-{BASE}"]
    assert artifact.type == "markdown" and artifact.data == card


def test_an_expert_of_another_base_is_refused_with_the_reason(pipeline_env, tiny_zoo):
    config = pipeline_config(tiny_zoo)
    other = store_expert(tiny_zoo, "physics", pipeline_env, base="other-base", register=False)
    with pytest.raises(RegistryError, match="registered for base 'other-base'.*merges experts of 'zoo-base'"):
        configured(on_new_expert, config.runner, pipeline_env)(
            config, s3_uri=other, sha256="ab" * 32, version="1", domain="physics", base="other-base")
    client = MlflowClient(pipeline_env.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment_name)
    refused = client.search_runs([experiment.experiment_id], "tags.`mergeplan.decision` = 'refused'")
    assert refused and "other-base" in refused[0].data.tags["mergeplan.reason"]
    assert refused[0].info.status == "FAILED"  # the run of a flow that raised is closed as failed, not left running


def test_mergeplan_run_prints_the_decision(pipeline_env, prefect_api_url, tiny_zoo, tmp_path, run_cli):
    config = pipeline_config(tiny_zoo)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config.as_parameters()))
    with mock.patch.dict(os.environ, {"MERGEPLAN_PREFECT_API_URL": prefect_api_url}):
        status, out, err = run_cli("run", path)
    assert status == 0, err
    lines = out.splitlines()
    assert len(lines) == 4 and lines[0].startswith("merged ") and "(algebra, analysis, biology" in lines[0]
    assert lines[1].startswith("decision: ") and "merged.zoo-base version" in lines[2]
    assert "champion" in lines[2].split(", ", 1)[1]  # the verdict: crowned or not, and against what
    assert lines[3].startswith("MLflow run ") and lines[3].endswith("?workflowType=machine_learning")


def test_mergeplan_run_with_mlflow_down_is_one_line(pipeline_env, tiny_zoo, tmp_path, run_cli):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline_config(tiny_zoo).as_parameters()))
    with mock.patch.dict(os.environ, {"MERGEPLAN_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}):
        status, out, err = run_cli("run", path)
    assert status == 2 and err.count("\n") == 1 and "is unreachable" in err and "mergeplan up" in err
