"""Real services on loopback for the storage, registry and webhook tests: a moto S3 server and an MLflow server
started once per session through infra.stack (so its start/stop code runs here too), and Prefect's test harness.

With MERGEPLAN_TEST_DB=postgres (`make test-postgres`) the same tests run on the production backends: a local
PostgreSQL cluster holds MLflow's store, and a Prefect server of the stack on it replaces the harness's sqlite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from unittest import mock

import pytest
from mlops_support import free_port, postgres_reachable_folder, stack_settings
from pipeline_support import PIPELINE_DOMAINS, store_zoo

from infra import stack
from infra.s3 import s3_client, upload_expert
from infra.settings import Settings

ON_POSTGRES = os.environ.get("MERGEPLAN_TEST_DB") == "postgres"


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory) -> Iterator[Settings]:
    """A moto S3 server with the bucket, for the whole session (and the database when ON_POSTGRES); the settings also
    name free MLflow and Prefect ports."""
    if not ON_POSTGRES:
        settings = stack_settings(tmp_path_factory.mktemp("stack"))
        stack.up(settings, ["s3"])
        yield settings
        stack.down(settings, ["s3"])
        return
    with postgres_reachable_folder(tmp_path_factory.mktemp("stack")) as root:
        settings = stack_settings(root / "state", db="postgres", postgres_port=free_port())
        stack.up(settings, ["s3", "postgres"])
        yield settings
        stack.down(settings, ["s3", "postgres"])


@pytest.fixture(scope="session")
def services(s3_service) -> Iterator[Settings]:
    """S3 and an MLflow server (sqlite, or the PostgreSQL of s3_service; artifacts on the moto S3) for the session."""
    # MLflow caches its webhook list for 60 s by default: the webhook tests add one after other tests registered.
    with mock.patch.dict(os.environ, {"MLFLOW_WEBHOOK_CACHE_TTL": "1"}):
        stack.up(s3_service, ["mlflow"])
    assert not ON_POSTGRES or not (s3_service.state_dir / "mlflow.db").exists(), "MLflow is not on PostgreSQL"
    yield s3_service
    stack.down(s3_service, ["mlflow"])


@pytest.fixture(scope="session")
def prefect_api_url(tmp_path_factory, request) -> Iterator[str]:
    """A Prefect server from Prefect's own test harness (or the stack's, on PostgreSQL), with a PREFECT_HOME of its
    own."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect_home")
    if ON_POSTGRES:
        settings = request.getfixturevalue("s3_service")
        stack.up(settings, ["prefect"])
        assert not (settings.state_dir / "prefect.db").exists(), "Prefect is not on PostgreSQL"
        with temporary_settings(updates={PREFECT_HOME: home, PREFECT_API_URL: settings.prefect_api_url}):
            yield settings.prefect_api_url
        stack.down(settings, ["prefect"])
        return
    with temporary_settings(updates={PREFECT_HOME: home, PREFECT_SERVER_ANALYTICS_ENABLED: False}), \
            prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture()
def s3(s3_service):
    return s3_client(s3_service)


@pytest.fixture(scope="session")
def stored_base(s3_service, zoo) -> str:
    """The session zoo's base, uploaded where the layout keeps base `tiny-base`."""
    uri = f"s3://{s3_service.bucket}/bases/tiny-base"
    upload_expert(zoo["base"], uri, settings=s3_service)
    return uri


@pytest.fixture(scope="module")
def pipeline_env(services, prefect_api_url, tiny_zoo) -> Iterator[Settings]:
    """The settings in the environment (tasks read it, as they do in a worker), the zoo stored and registered."""
    with mock.patch.dict(os.environ, services.as_env()):
        store_zoo(tiny_zoo, PIPELINE_DOMAINS, services)
        yield services

