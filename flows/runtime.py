"""How a flow runs, from configuration: its task runner (threads, or Dask: a new LocalCluster or a scheduler
address) and where its task results and cache records persist."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import Flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline_config import RunnerSettings
from infra.errors import StackError
from infra.settings import Settings, redact_url, without_userinfo
from tasks.caching import RESULT_SERIALIZER, result_storage


def task_runner(runner: RunnerSettings):
    if runner.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    from prefect_dask import DaskTaskRunner

    if runner.address:
        return DaskTaskRunner(address=runner.address)
    # Worker processes, not threads: merges and evaluations hold the GIL for long stretches.
    return DaskTaskRunner(cluster_kwargs={"n_workers": runner.n_workers,
                                          "threads_per_worker": runner.threads_per_worker,
                                          "processes": True, "host": "127.0.0.1", "dashboard_address": None})


def configured(flow: Flow, runner: RunnerSettings, settings: Settings) -> Flow:
    """FLOW with the configured task runner, persisting results as JSON under the state folder."""
    return flow.with_options(task_runner=task_runner(runner), result_storage=result_storage(settings),
                             result_serializer=RESULT_SERIALIZER, persist_result=True)


@contextmanager
def prefect_api(settings: Settings) -> Iterator[None]:
    """Flows in this block report to the configured Prefect server, which must answer its health check first."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    health = without_userinfo(settings.prefect_api_url).rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=settings.mlflow_timeout_s):
            pass
    except (urllib.error.URLError, OSError) as exc:
        raise StackError(f"Prefect at {redact_url(settings.prefect_api_url)} is unreachable "
                         f"({getattr(exc, 'reason', exc)}); start the local stack with `mergeplan up` or set "
                         "MERGEPLAN_PREFECT_API_URL") from exc
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        yield
