"""The pipeline on Prefect workers, as production runs it: `mergeplan deploy` registers the deployments to a process
work pool of a real Prefect server (scheduler and automations running), `prefect worker start` runs in processes of
its own, and the runs go through them: a registration's triggered run, a lost registration's run from `deploy`, the
sweep on its cron schedule, and a run whose worker died with its machine, rescheduled for another worker."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import pytest
import yaml
from mlops_support import SECRET_KEY
from pipeline_support import PIPELINE_DOMAINS, pipeline_config, store_expert
from workers_support import (
    deployment_runs,
    finished_mlflow_runs,
    kill_machine,
    mergeplan,
    process_env,
    read_deployment,
    receiver,
    run_of,
    state_names,
    worker,
)

from flows.deployments import NIGHTLY
from flows.merge_pipeline import merge_pipeline
from flows.pipeline_config import PipelineConfig
from flows.runtime import configured, prefect_api
from infra import stack
from infra.registry import MERGE_KEY, head_version, merged_model_name, mlflow_client
from infra.s3 import upload_expert
from infra.settings import Settings
from mergeplan.pipeline_demo import wait_until
from tasks.fetch import merged_experts

pytestmark = pytest.mark.cluster

BASE = "worker-base"  # this module's own: the other pipeline tests' heads and experiments are left alone
POOL = "mergeplan-test"
UNRESPONSIVE_AFTER_S = 90  # three of the workers' heartbeats (30 s)
RUN_TIMEOUT_S = 600  # one on-new-expert run on 2 busy cores, with room
IDENTITY = ("base", "experts", "method", "params", "seed", "data")  # of the pipeline config each deployment carries


class Cluster(NamedTuple):
    settings: Settings
    config: PipelineConfig
    config_file: Path
    env: dict[str, str]
    folder: Path


@pytest.fixture(scope="module")
def cluster(services, tiny_zoo, tmp_path_factory) -> Iterator[Cluster]:
    """The session's S3 and MLflow; a Prefect server started as `mergeplan up` starts it (its scheduler and
    automations run, unlike the test harness's); the zoo's base and three experts under BASE, merged into a head;
    the deployments registered to POOL by `mergeplan deploy`."""
    folder = tmp_path_factory.mktemp("workers")
    config = pipeline_config(tiny_zoo, base={"name": BASE},
                             sweep={"methods": ["average"], "design": "balanced", "eval_examples": 4})
    config_file = folder / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(config.as_parameters()))
    stack.up(services, ["prefect"])
    try:
        with mock.patch.dict(os.environ, services.as_env()):
            upload_expert(tiny_zoo / "base", f"s3://{services.bucket}/bases/{BASE}", settings=services)
            for domain in PIPELINE_DOMAINS:
                store_expert(tiny_zoo, domain, services, base=BASE)
            with prefect_api(services):
                configured(merge_pipeline, config.runner, services)(config)  # the head the new experts join
            env = process_env(services, folder / "prefect-home")
            mergeplan(env, "deploy", config_file, "--pool", POOL, "--unresponsive-after", UNRESPONSIVE_AFTER_S,
                      "--no-reconcile")
            yield Cluster(services, config, config_file, env, folder)
    finally:
        stack.down(services, ["prefect"])


def through(run, worker_name: str) -> bool:
    """Whether RUN completed in the worker WORKER_NAME of POOL (a worker labels each run it takes)."""
    return (run.state_type.value == "COMPLETED" and run.work_pool_name == POOL
            and run.labels.get("prefect.worker.name") == worker_name)


def taking(s3_uri: str):
    """Accepts the runs whose parameters name the expert at S3_URI."""
    return lambda run: run.parameters.get("s3_uri") == s3_uri


def test_registrations_are_merged_by_a_worker_of_the_pool(cluster, tiny_zoo):
    settings, api = cluster.settings, cluster.settings.prefect_api_url
    triggered = read_deployment(api, f"on-new-expert/{BASE}")
    nightly = read_deployment(api, f"scaling-sweep/{BASE}")
    for deployment in (triggered, nightly):  # what `serve` deploys, in the pool, with no secret in it
        assert deployment.work_pool_name == POOL and deployment.global_concurrency_limit.limit == 1
        deployed, expected = deployment.parameters["config"], cluster.config.as_parameters()
        assert {key: deployed[key] for key in IDENTITY} == {key: expected[key] for key in IDENTITY}
        assert deployment.entrypoint.startswith("flows.deployments.")
        assert SECRET_KEY not in json.dumps(deployment.job_variables)
    assert [s.schedule.cron for s in nightly.schedules] == [NIGHTLY]

    # registered while nothing listened (no receiver): a second deploy finds it and starts a run for it
    lost = store_expert(tiny_zoo, "geometry", settings, base=BASE)
    out = mergeplan(cluster.env, "deploy", cluster.config_file, "--pool", POOL, "--unresponsive-after",
                    UNRESPONSIVE_AFTER_S)
    assert "registered experts no run has taken" in out, out
    with worker(POOL, "worker-a", cluster.env, cluster.folder):
        reconciled = wait_until(lambda: run_of(api, f"on-new-expert/{BASE}", lambda r: taking(lost.s3_uri)(r)
                                               and r.state.is_final()), RUN_TIMEOUT_S, "the reconciling run")
        with receiver(settings):
            added = store_expert(tiny_zoo, "chemistry", settings, base=BASE)
            run = wait_until(lambda: run_of(api, f"on-new-expert/{BASE}", lambda r: taking(added.s3_uri)(r)
                                            and r.state.is_final()), RUN_TIMEOUT_S, "the triggered run")
    assert through(reconciled, "worker-a") and through(run, "worker-a"), (reconciled.state, run.state)
    assert run.created_by.type == "AUTOMATION"  # the deployment's trigger made it
    for expert in (lost, added):
        [finished] = finished_mlflow_runs(settings, cluster.config.experiment_name, expert.s3_uri)
        assert finished.data.tags["mergeplan.incremental"] == "true"
    held = [ref.domain for ref in merged_experts(head_version(BASE, settings=settings))]
    assert held[-2:] == ["geometry", "chemistry"]


def test_the_sweep_runs_on_its_cron_schedule_through_a_worker(cluster):
    api = cluster.settings.prefect_api_url
    at = (datetime.now(UTC) + timedelta(seconds=240)).replace(second=0, microsecond=0)
    mergeplan(cluster.env, "deploy", cluster.config_file, "--pool", POOL, "--unresponsive-after",
              UNRESPONSIVE_AFTER_S, "--no-reconcile", "--cron", f"{at.minute} {at.hour} * * *")
    with worker(POOL, "worker-s", cluster.env, cluster.folder):
        run = wait_until(lambda: run_of(api, f"scaling-sweep/{BASE}", lambda r: r.expected_start_time == at
                                        and r.state.is_final()), 240 + RUN_TIMEOUT_S, "the scheduled sweep")
    assert through(run, "worker-s") and run.auto_scheduled, run.state
    client = mlflow_client(cluster.settings)
    experiment = client.get_experiment_by_name(cluster.config.experiment_name).experiment_id
    assert client.search_runs([experiment], "tags.`mergeplan.flow` = 'scaling-sweep' and attributes.status = "
                              "'FINISHED'")


def test_a_run_whose_machine_died_is_finished_by_another_worker_once(cluster, tiny_zoo):
    settings, api = cluster.settings, cluster.settings.prefect_api_url
    experiment = cluster.config.experiment_name
    with worker(POOL, "worker-doomed", cluster.env, cluster.folder) as doomed, receiver(settings):
        added = store_expert(tiny_zoo, "physics", settings, base=BASE)
        # mid-run: the flow run is Running and has opened its MLflow run (fetching, merging)
        started = wait_until(lambda: run_of(api, f"on-new-expert/{BASE}", lambda r: taking(added.s3_uri)(r)
                                            and r.state_type.value == "RUNNING"), RUN_TIMEOUT_S, "the run to start")
        wait_until(lambda: mlflow_client(settings).search_runs(
            [mlflow_client(settings).get_experiment_by_name(experiment).experiment_id],
            f"tags.`mergeplan.new_expert` = '{added.s3_uri}'"), RUN_TIMEOUT_S, "its MLflow run")
        kill_machine(doomed)
    killed_at = time.monotonic()
    with worker(POOL, "worker-b", cluster.env, cluster.folder):
        run = wait_until(lambda: run_of(api, f"on-new-expert/{BASE}", lambda r: r.id == started.id
                                        and r.state.is_final() and r.state_type.value != "CRASHED"),
                         UNRESPONSIVE_AFTER_S + 120 + RUN_TIMEOUT_S, "the rescheduled run")
    assert through(run, "worker-b") and run.run_count == 2, (run.state, run.run_count)
    history = state_names(api, run)
    assert history.index("Crashed") < history.index("AwaitingRetry") < len(history) - 1, history
    assert time.monotonic() - killed_at >= UNRESPONSIVE_AFTER_S - 30  # found by its missing heartbeats, not sooner
    assert len([r for r in deployment_runs(api, f"on-new-expert/{BASE}") if taking(added.s3_uri)(r)]) == 1

    # merged once: one finished MLflow run, one version per merge, the expert once in the head
    assert len(finished_mlflow_runs(settings, experiment, added.s3_uri)) == 1
    versions = mlflow_client(settings).search_model_versions(f"name = '{merged_model_name(BASE)}'")
    keys = [version.tags[MERGE_KEY] for version in versions]
    assert len(keys) == len(set(keys)), keys
    assert [ref.domain for ref in merged_experts(head_version(BASE, settings=settings))].count("physics") == 1
