"""infra/docker-compose.yml runs the production topology with the settings the cluster tests use (this machine has no
Docker: the file is checked against the code and the tests' own constants, not run)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from dask_support import TASK_MODULES

from flows.deployments import DEFAULT_POOL
from infra.postgres import DATABASES, LOCAL_USER
from infra.settings import Settings, env_name

COMPOSE = Path(__file__).resolve().parents[2] / "infra" / "docker-compose.yml"
HEARTBEATS_PER_TIMEOUT = 3  # as tests/pipeline/test_cluster_workers.py: 30 s heartbeats, dead after 90 s


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def command(compose: dict, service: str) -> list[str]:
    return shlex.split(compose["services"][service]["command"])


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_dask_processes_take_the_tests_flags(compose):
    preloads = [arg for module in TASK_MODULES for arg in ("--preload", module)]
    scheduler, worker = command(compose, "dask-scheduler"), command(compose, "dask-worker")
    assert scheduler[:2] == ["dask", "scheduler"] and worker[:2] == ["dask", "worker"]
    for argv in (scheduler, worker):
        assert " ".join(preloads) in " ".join(argv)
        assert option(argv, "--dashboard-address").startswith("127.0.0.1:")
    assert option(worker, "--nthreads") == "1" and option(worker, "--nworkers") == "1"
    assert worker[2] == f"tcp://dask-scheduler:{option(scheduler, '--port')}"


def test_the_deployments_go_to_the_pool_the_worker_polls(compose):
    deploy, worker = command(compose, "deploy"), command(compose, "worker")
    assert deploy[:2] == ["mergeplan", "deploy"]
    assert option(deploy, "--pool") == option(worker, "--pool") == DEFAULT_POOL
    assert option(worker, "--type") == "process"
    heartbeat = float(compose["services"]["worker"]["environment"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
    assert float(option(deploy, "--unresponsive-after")) >= HEARTBEATS_PER_TIMEOUT * heartbeat
    assert compose["services"]["worker"]["depends_on"]["deploy"]["condition"] == "service_completed_successfully"


def test_postgres_holds_the_user_and_databases_the_local_cluster_has(compose):
    postgres = compose["services"]["postgres"]["environment"]
    assert postgres["POSTGRES_USER"] == LOCAL_USER
    created = {postgres["POSTGRES_DB"], compose["configs"]["prefect-database"]["content"].split()[2].rstrip(";")}
    assert created == set(DATABASES)
    assert "--auth-host=scram-sha-256" in postgres["POSTGRES_INITDB_ARGS"].split()


def test_every_mergeplan_variable_is_one_the_settings_read(compose):
    known = {env_name(field) for field in Settings.model_fields}
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        unknown = {key for key in environment if key.startswith("MERGEPLAN_")} - known - {"MERGEPLAN_PIPELINE_DIR"}
        assert not unknown, f"{name}: {sorted(unknown)}"
