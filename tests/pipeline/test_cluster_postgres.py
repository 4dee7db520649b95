"""MLflow and Prefect on PostgreSQL (MERGEPLAN_DB=postgres): the stack comes up with a local cluster, a pipeline run
is stored in it, a SIGKILL of the database server mid-run loses nothing and the rerun finishes, and a refused login
is one line that never shows the password.

Cluster (`make test-cluster`): a PostgreSQL cluster, MLflow, Prefect and a few pipeline runs, minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import psutil
import pytest
import yaml
from mlflow import MlflowClient
from mlops_support import free_port, postgres_reachable_folder, stack_settings
from pipeline_support import BASE, PIPELINE_DOMAINS, pipeline_config, store_zoo

from infra import postgres, stack
from infra.errors import StackError
from infra.registry import CHAMPION, HEAD, MERGE_KEY, merged_model_name
from infra.settings import Settings, resolve_db_password

pytestmark = pytest.mark.cluster

REPO = Path(__file__).parents[2]
SERVICES = ["s3", "postgres", "mlflow", "prefect"]
# Stages a rerun takes from the cache when they finished before the crash ("add NAME": an incremental merge).
FINISHED_STAGES = ("fetch", "merge", "add", "evaluate", "upload", "fit")


@pytest.fixture(scope="module")
def state_root(tmp_path_factory) -> Iterator[Path]:
    with postgres_reachable_folder(tmp_path_factory.mktemp("postgres-stack")) as root:
        yield root


@pytest.fixture(scope="module")
def services(state_root, tiny_zoo) -> Iterator[Settings]:
    """The stack on free ports with MERGEPLAN_DB=postgres (S3 in memory: only the database is killed here)."""
    settings = stack_settings(state_root / "state", db="postgres", postgres_port=free_port())
    stack.up(settings, SERVICES)
    try:
        with mock.patch.dict(os.environ, settings.as_env()):
            store_zoo(tiny_zoo, PIPELINE_DOMAINS, settings)
        yield settings
    finally:
        stack.down(settings, SERVICES)


def query(settings: Settings, database: str, statement: str) -> list[tuple]:
    connection = postgres.connect(settings, database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(statement)
            return cursor.fetchall()
    finally:
        connection.close()


def stored_runs(settings: Settings) -> set[str]:
    """The ids of the finished MLflow runs, read from PostgreSQL."""
    return {run_id for (run_id,) in query(settings, "mlflow", "SELECT run_uuid FROM runs WHERE status = 'FINISHED'")}


def stored_flow_runs(settings: Settings, flow_name: str) -> dict[str, str]:
    """Flow run id -> state, of FLOW_NAME's runs, read from PostgreSQL."""
    rows = query(settings, "prefect", "SELECT flow_run.id, flow_run.state_type FROM flow_run JOIN flow "
                                      f"ON flow.id = flow_run.flow_id WHERE flow.name = '{flow_name}'")
    return {str(run_id): state for run_id, state in rows}


def run_cli(settings: Settings, *args: object, **env: str) -> subprocess.Popen:
    env = {**settings.as_env(), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           "PREFECT_HOME": str(settings.state_dir / "prefect-client"), **env}
    return subprocess.Popen([sys.executable, "-m", "mergeplan.cli", *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def outcome(run: subprocess.Popen, timeout_s: float = 600) -> tuple[int, str, str]:
    out, err = run.communicate(timeout=timeout_s)
    return run.returncode, out, err


def pipeline_file(zoo: Path, folder: Path, weight: float) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline_config(zoo, params={"lambda": weight}).as_parameters()))
    return path


def process_tree(settings: Settings, name: str) -> list[psutil.Process]:
    root = psutil.Process(json.loads((settings.stack_dir / f"{name}.pid").read_text())["pid"])
    return [root, *root.children(recursive=True)]


def arguments(process: psutil.Process) -> str:
    """PROCESS's command line; empty when it has exited meanwhile (a backend whose session ended)."""
    try:
        return " ".join(process.cmdline())
    except psutil.NoSuchProcess:
        return ""


def test_a_pipeline_run_is_stored_in_postgres(services, tiny_zoo, tmp_path):
    status, out, err = outcome(run_cli(services, "run", pipeline_file(tiny_zoo, tmp_path, 0.2)))
    assert status == 0, err
    assert out.startswith("merged 3 experts") and "merged.zoo-base version" in out

    client = MlflowClient(services.mlflow_tracking_uri)
    versions = client.search_model_versions(f"name = '{merged_model_name(BASE)}'")
    stored_versions = query(services, "mlflow", "SELECT version, run_id, source FROM model_versions "
                                                f"WHERE name = '{merged_model_name(BASE)}'")
    assert versions and {(int(v.version), v.run_id, v.source) for v in versions} == set(stored_versions)
    assert {v.run_id for v in versions} <= stored_runs(services)
    aliases = query(services, "mlflow", "SELECT alias FROM registered_model_aliases "
                                        f"WHERE name = '{merged_model_name(BASE)}'")
    assert {CHAMPION, HEAD} <= {alias for (alias,) in aliases}
    assert set(stored_flow_runs(services, "merge-pipeline").values()) == {"COMPLETED"}
    assert not (services.state_dir / "mlflow.db").exists() and not (services.state_dir / "prefect.db").exists()

    # the cluster listens on loopback only, and its password is in no process's arguments
    password = resolve_db_password(services)
    processes = [p for name in ("postgres", "mlflow", "prefect") for p in process_tree(services, name)]
    listening = {conn.laddr.ip for conn in process_tree(services, "postgres")[0].net_connections(kind="inet")
                 if conn.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}
    assert not any(password in arguments(process) for process in processes)
    assert (services.stack_dir / "postgres-password").stat().st_mode & 0o777 == 0o600


def fits(settings: Settings) -> set[str]:
    """The cache records of finished law fits: one is written when a fit-law task's result is persisted."""
    results = settings.state_dir / "results"
    return {p.name for p in results.glob("fit-law-*")} if results.is_dir() else set()


def refused_since(settings: Settings, sizes: dict[str, int]) -> bool:
    """Whether MLflow's or Prefect's log, past SIZES, shows a refused connection to the database."""
    for name, size in sizes.items():
        with open(settings.stack_dir / f"{name}.log", "rb") as log:
            log.seek(size)
            written = log.read()
        if b"Connection refused" in written or b"Connect call failed" in written:
            return True
    return False


def merged_versions(settings: Settings) -> list[str]:
    """The merge key of every version of the merged model."""
    client = MlflowClient(settings.mlflow_tracking_uri)
    return [v.tags[MERGE_KEY] for v in client.search_model_versions(f"name = '{merged_model_name(BASE)}'")]


# short: the server is back while the run's clients still retry, and the run itself finishes. long: the clients
# give up first (their retries cut to one or two, where MLflow's default alone waits about 4 min per request), the
# run fails, and its rerun finishes from the cache.
OUTAGES = {"short": {}, "long": {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "PREFECT_CLIENT_MAX_RETRIES": "2"}}


@pytest.mark.parametrize("outage", OUTAGES)
def test_the_database_killed_midway_loses_nothing(services, tiny_zoo, tmp_path, outage):
    path = pipeline_file(tiny_zoo, tmp_path, 0.23 + 0.01 * list(OUTAGES).index(outage))  # a merge of its own
    before = fits(services)
    run = run_cli(services, "run", path, **OUTAGES[outage])
    deadline = time.monotonic() + 300
    while fits(services) == before:  # the merge, its evaluation and the law fit are done and cached
        assert run.poll() is None, f"the run ended before its fit was cached: {run.communicate()}"
        assert time.monotonic() < deadline, "no fit was cached within 300 s"
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGSTOP)
    runs_before, flow_runs_before = stored_runs(services), stored_flow_runs(services, "merge-pipeline")
    versions_before = merged_versions(services)
    logs = {name: (services.stack_dir / f"{name}.log").stat().st_size for name in ("mlflow", "prefect")}
    server = process_tree(services, "postgres")[0]
    server.kill()  # kill -9 of the postmaster; its backends end themselves when they see it gone
    psutil.wait_procs([server], timeout=10)
    os.killpg(run.pid, signal.SIGCONT)
    assert [s.state for s in stack.status(services) if s.name == "postgres"] == ["dead"]

    if outage == "long":
        status, out, err = outcome(run)
        assert status != 0 and "Traceback" not in err.splitlines()[-1], (out, err)
    else:
        deadline = time.monotonic() + 120
        while not refused_since(services, logs):  # the run has reached the dead database
            assert time.monotonic() < deadline, "no request reached the dead database within 120 s"
            time.sleep(0.2)
    states = {state.name: state.note for state in stack.up(services, SERVICES)}
    assert states["postgres"] == "started" and states["mlflow"] == states["prefect"] == "already running"
    status, out, err = outcome(run if outage == "short" else run_cli(services, "run", path))
    assert status == 0, err
    assert out.startswith("merged 3 experts") and "merged.zoo-base version" in out

    # what was committed before the kill is there, and the merge is registered once
    assert runs_before < stored_runs(services)
    flow_runs = stored_flow_runs(services, "merge-pipeline")
    assert set(flow_runs_before) <= set(flow_runs)
    keys = merged_versions(services)
    assert len(keys) == len(set(keys)) == len(versions_before) + 1, keys
    if outage == "short":  # the flow run that was in flight when the server died finished
        assert list(flow_runs.values()).count("COMPLETED") == list(flow_runs_before.values()).count("COMPLETED") + 1
        return
    [(rerun,)] = query(services, "prefect", "SELECT flow_run.id FROM flow_run JOIN flow ON flow.id = flow_run.flow_id "
                                            "WHERE flow.name = 'merge-pipeline' ORDER BY start_time DESC LIMIT 1")
    task_states = query(services, "prefect", f"SELECT name, state_name FROM task_run WHERE flow_run_id = '{rerun}'")
    cached = {name: state for name, state in task_states if re.split("[ -]", name)[0] in FINISHED_STAGES}
    assert cached and set(cached.values()) == {"Cached"}, task_states


def test_a_wrong_database_password_is_one_line_without_it(services, state_root, monkeypatch, capsys):
    from mergeplan.cli import main

    wrong = "mergeplan-test-wrong-db-password-3f9a"
    given = f"postgresql://{postgres.LOCAL_USER}@127.0.0.1:{services.postgres_port}"
    env = {"MERGEPLAN_STATE_DIR": str(state_root / "elsewhere"), "MERGEPLAN_DB": given,
           "MERGEPLAN_DB_PASSWORD": wrong, "MERGEPLAN_S3_SERVER": "moto"}
    for name in ("S3", "MLFLOW", "PREFECT", "WEBHOOK"):
        env[f"MERGEPLAN_{name}_PORT"] = str(free_port())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["up"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(
        f"error: database mlflow: PostgreSQL at 127.0.0.1:{services.postgres_port} refused the login of mergeplan "
        "(password authentication failed for user \"mergeplan\"); set MERGEPLAN_DB_PASSWORD"), err
    assert wrong not in out + err
    assert not list((state_root / "elsewhere" / "stack").glob("*.pid"))  # nothing was started

    # the password in the URL instead: refused before anything is tried, and not echoed
    monkeypatch.setenv("MERGEPLAN_DB", given.replace("@", f":{wrong}@"))
    assert main(["status"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: environment: MERGEPLAN_DB: ") and "MERGEPLAN_DB_PASSWORD" in err
    assert wrong not in out + err

    # the right password: the given server serves (the databases are there)
    right = Settings(state_dir=state_root / "elsewhere", db=given, db_password=resolve_db_password(services))
    postgres.ensure_databases(right)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as the postgres user")
def test_a_state_folder_the_server_user_cannot_enter_is_named(tmp_path):
    settings = Settings(state_dir=tmp_path / "state", db="postgres", postgres_port=free_port())
    with pytest.raises(StackError, match=r"runs it as the 'postgres' user, who may not enter .* \(mode 700\); "
                                               "set MERGEPLAN_STATE_DIR"):
        stack.up(settings, ["postgres"])
    assert not (settings.stack_dir / "postgres.pid").exists()
