"""Helpers of the work-pool tests: `mergeplan deploy` and `prefect worker start` as separate processes (as production
runs them), a machine's death, the webhook receiver, and the Prefect flow runs of a deployment."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
from mlops_support import WEBHOOK_SECRET, free_port
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings
from test_webhook import running

from infra.registry import WEBHOOK_NAME, ensure_webhook, mlflow_client
from infra.settings import Settings, local_url
from infra.webhook import WebhookServer, prefect_emitter

REPO = Path(__file__).parents[2]
PREFECT = Path(sys.executable).parent / "prefect"
HEARTBEAT_S = 30  # Prefect's shortest flow-run heartbeat interval


def process_env(settings: Settings, home: Path) -> dict[str, str]:
    """What a worker's (or the deploying) machine has: the settings and credentials, the Prefect server, no network."""
    return {**settings.as_env(), "PATH": "/usr/bin:/bin", "PREFECT_API_URL": settings.prefect_api_url,
            "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S), "PREFECT_WORKER_QUERY_SECONDS": "2"}


def mergeplan(env: dict[str, str], *args: object, timeout_s: float = 300) -> str:
    """`mergeplan ARGS` in a process of its own; its output, or AssertionError with it when it fails."""
    done = subprocess.run([sys.executable, "-m", "mergeplan.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"mergeplan {' '.join(map(str, args))}: {done.stdout}{done.stderr}"
    return done.stdout


@contextmanager
def worker(pool: str, name: str, env: dict[str, str], folder: Path) -> Iterator[subprocess.Popen]:
    """`prefect worker start --pool POOL --name NAME`, run from FOLDER (not the repository: the flows come from the
    installed package); stopped, with every process under it, on the way out."""
    log = folder / f"{name}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([str(PREFECT), "worker", "start", "--pool", pool, "--name", name], env=env,
                                   cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    except Exception as failure:
        raise AssertionError(f"{failure}; worker {name}'s log:\n{log.read_text()[-4000:]}") from failure
    finally:
        kill_machine(process)


def kill_machine(process: subprocess.Popen) -> None:
    """SIGKILL PROCESS and every process under it, as when the machine they run on dies: the flow-run process runs
    in a session of its own, so it would outlive its worker's process group."""
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in tree:
        with suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(tree, timeout=30)
    process.wait(30)


@contextmanager
def receiver(settings: Settings) -> Iterator[None]:
    """The webhook receiver in this process, MLflow's webhook pointing at it: a registration emits the event."""
    port = free_port()
    hooked = settings.model_copy(update={"webhook_port": port, "webhook_url": local_url("webhook", port)})
    emit = prefect_emitter(settings.prefect_api_url)
    with contextmanager(running)(WebhookServer(hooked, WEBHOOK_SECRET, emit=emit)):
        ensure_webhook(hooked.webhook_url, WEBHOOK_SECRET, settings=hooked)
        time.sleep(1.5)  # the MLflow server of the tests caches its webhook list for 1 s
        try:
            yield
        finally:
            hooks = mlflow_client(settings)
            for hook in hooks.list_webhooks():
                if hook.name == WEBHOOK_NAME:
                    hooks.delete_webhook(hook.webhook_id)


def read_deployment(api_url: str, name: str):
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def deployment_runs(api_url: str, name: str) -> list[FlowRun]:
    """Every flow run of the deployment NAME (FLOW/DEPLOYMENT)."""
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))


def run_of(api_url: str, name: str, accept: Callable[[FlowRun], bool]) -> FlowRun | None:
    """The first run of the deployment NAME that ACCEPT takes, or None."""
    return next((run for run in deployment_runs(api_url, name) if accept(run)), None)


def state_names(api_url: str, run: FlowRun) -> list[str]:
    """The names of RUN's states, oldest first."""
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return [state.name for state in sorted(client.read_flow_run_states(run.id), key=lambda s: s.timestamp)]


def finished_mlflow_runs(settings: Settings, experiment: str, s3_uri: str) -> list:
    """The FINISHED on-new-expert MLflow runs that took the expert at S3_URI."""
    client = mlflow_client(settings)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], f"tags.`mergeplan.new_expert` = '{s3_uri}' and "
                              "attributes.status = 'FINISHED'") if found else []
