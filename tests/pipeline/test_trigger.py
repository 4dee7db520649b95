"""The whole chain with real components: register an expert in MLflow -> MLflow's webhook -> the receiver ->
Prefect event -> the served on-new-expert deployment's trigger -> a flow run -> an MLflow run with the decision."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml
from mlflow import MlflowClient
from mlops_support import WEBHOOK_SECRET, free_port
from pipeline_support import BASE, pipeline_config, store_expert
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from test_webhook import running

from flows.merge_pipeline import merge_pipeline
from flows.runtime import configured
from infra.errors import StackError
from infra.registry import WEBHOOK_NAME, ensure_webhook, mlflow_client
from infra.settings import local_url
from infra.webhook import WebhookServer, prefect_emitter
from mergeplan.pipeline_demo import wait_until
from tasks.caching import result_storage


def served_deployment(api_url: str, name: str):
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def finished_run_for(client: MlflowClient, experiment: str, s3_uri: str):
    runs = client.search_runs([experiment], f"tags.`mergeplan.new_expert` = '{s3_uri}' and "
                              "attributes.status = 'FINISHED'")
    return runs[0] if runs else None


def test_registering_an_expert_runs_on_new_expert_and_logs_its_decision(pipeline_env, prefect_api_url, tiny_zoo,
                                                                        tmp_path: Path):
    config = pipeline_config(tiny_zoo)
    configured(merge_pipeline, config.runner, pipeline_env)(config)  # the champion to add to (cached if made before)
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(config.as_parameters()))
    port = free_port()
    settings = pipeline_env.model_copy(update={"webhook_port": port, "webhook_url": local_url("webhook", port),
                                               "prefect_api_url": prefect_api_url})
    env = {**settings.as_env(), "PATH": "/usr/bin:/bin", "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mergeplan.cli", "serve", str(config_file)], env=env,
                                  stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])
    try:
        # serve creates the deployments one after the other: wait for the last one, not just the first
        wait_until(lambda: (served_deployment(prefect_api_url, f"on-new-expert/{BASE}")
                          and served_deployment(prefect_api_url, f"scaling-sweep/{BASE}")) or server.poll() is not None,
                 90, "the deployments")
        assert server.poll() is None, "mergeplan serve exited"
        nightly = served_deployment(prefect_api_url, f"scaling-sweep/{BASE}")
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
        triggered = served_deployment(prefect_api_url, f"on-new-expert/{BASE}")
        assert triggered.global_concurrency_limit.limit == 1 and nightly.global_concurrency_limit.limit == 1
        with contextmanager(running)(WebhookServer(settings, WEBHOOK_SECRET, emit=prefect_emitter(prefect_api_url))):
            ensure_webhook(settings.webhook_url, WEBHOOK_SECRET, settings=settings)
            time.sleep(1.5)  # the MLflow server of the tests caches its webhook list for 1 s
            added = store_expert(tiny_zoo, "discrete", pipeline_env)
            client = MlflowClient(pipeline_env.mlflow_tracking_uri)
            experiment = client.get_experiment_by_name(config.experiment_name).experiment_id
            run = wait_until(lambda: finished_run_for(client, experiment, added.s3_uri), 240,
                           f"a finished on-new-expert run for {added.s3_uri}")
    except (AssertionError, StackError) as failure:
        raise AssertionError(f"{failure}; serve log:\n{log.read_text()[-3000:]}") from None
    finally:
        server.terminate()
        server.wait(30)
        hooks = mlflow_client(pipeline_env)
        for hook in hooks.list_webhooks():
            if hook.name == WEBHOOK_NAME:
                hooks.delete_webhook(hook.webhook_id)
    assert run.data.tags["mergeplan.flow"] == "on-new-expert"
    assert run.data.tags["mergeplan.decision"] in ("continue", "stop", "uncertain", "law_fails")
    assert run.data.tags["mergeplan.reason"].startswith(run.data.tags["mergeplan.decision"])
    assert run.data.tags["mergeplan.incremental"] == "true"
    assert run.data.params["expert.discrete.sha256"] == added.sha256
    # the served flow run kept its task results under the state folder, not in Prefect's default storage
    assert (result_storage(pipeline_env) / f"fetch-checkpoint-{added.sha256}").is_file()
    assert not list((tmp_path / "prefect").glob("storage/fetch-checkpoint-*"))
