"""Real services on loopback for the storage, registry and webhook tests: a moto S3 server and an MLflow server
started once per session through infra.stack (so its start/stop code runs here too), and Prefect's test harness."""

from __future__ import annotations

import os
from collections.abc import Iterator
from unittest import mock

import pytest
from mlops_support import stack_settings
from pipeline_support import PIPELINE_DOMAINS, store_zoo

from infra import stack
from infra.s3 import s3_client, upload_expert
from infra.settings import Settings


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory) -> Iterator[Settings]:
    """A moto S3 server with the bucket, for the whole session; the settings also name a free MLflow port."""
    settings = stack_settings(tmp_path_factory.mktemp("stack"))
    stack.up(settings, ["s3"])
    yield settings
    stack.down(settings, ["s3"])


@pytest.fixture(scope="session")
def services(s3_service) -> Iterator[Settings]:
    """S3 and an MLflow server (sqlite, artifacts on the moto S3) for the whole session."""
    # MLflow caches its webhook list for 60 s by default: the webhook tests add one after other tests registered.
    with mock.patch.dict(os.environ, {"MLFLOW_WEBHOOK_CACHE_TTL": "1"}):
        stack.up(s3_service, ["mlflow"])
    yield s3_service
    stack.down(s3_service, ["mlflow"])


@pytest.fixture(scope="session")
def prefect_api_url(tmp_path_factory) -> Iterator[str]:
    """A Prefect server from Prefect's own test harness, with a PREFECT_HOME of its own."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect_home")
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

