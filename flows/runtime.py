"""How a flow runs, from configuration: its task runner (threads, or Dask: a new LocalCluster or a scheduler
address) and where its task results and cache records persist.

On a scheduler's cluster (`runner.address`) the scheduler deals the tasks to whichever worker is free, and tasks
submitted inside `needing({"GPU": 1})` go only to workers started with `dask worker ADDRESS --resources GPU=1`.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dask
from distributed import KilledWorker, get_worker
from distributed.client import FutureCancelledError
from distributed.comm.core import CommClosedError
from prefect import Flow
from prefect.context import FlowRunContext
from prefect.logging.loggers import flow_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture

from flows.pipeline_config import RunnerSettings
from infra.errors import StackError
from infra.settings import Settings, redact_url, without_userinfo
from tasks.caching import RESULT_SERIALIZER, result_storage

# How long a flow run waits for the scheduler to answer before it fails with one line (Dask's default is 30 s).
CONNECT_TIMEOUT_S = 5.0


def task_runner(runner: RunnerSettings):
    if runner.kind == "threads":
        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    if runner.address:
        return ClusterTaskRunner(runner.address, report_s=runner.report_waits_s)
    # Worker processes, not threads: merges and evaluations hold the GIL for long stretches.
    return DaskTaskRunner(cluster_kwargs={"n_workers": runner.n_workers,
                                          "threads_per_worker": runner.threads_per_worker,
                                          "processes": True, "host": "127.0.0.1", "dashboard_address": None})


@contextmanager
def needing(resources: dict[str, float]) -> Iterator[None]:
    """On a scheduler's cluster, tasks submitted in this block run only on workers that declare RESOURCES (e.g.
    {"GPU": 1}). Elsewhere it does nothing: threads share the flow's machine, and a LocalCluster's workers declare
    no resources, so they would never run such a task."""
    context = FlowRunContext.get()
    if not resources or context is None or not isinstance(context.task_runner, ClusterTaskRunner):
        yield
        return
    with dask.annotate(resources=resources):
        yield


def describe_workers(workers: dict[str, dict[str, Any]]) -> str:
    """The workers of a scheduler_info() in a few words: how many, and which resources they declare."""
    declared = Counter(f"{name}={amount:g}" for worker in workers.values()
                       for name, amount in (worker.get("resources") or {}).items())
    resources = ", ".join(f"{name} on {count}" for name, count in sorted(declared.items()))
    return f"{len(workers)} workers" + (f" (resources: {resources})" if resources else " (no resources declared)")


class _ClusterFuture(PrefectDaskFuture):
    """A task's future on a scheduler's cluster: losing the scheduler, or every worker that ran the task, is a
    one-line StackError."""

    scheduler: str = ""

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        try:
            return super().result(timeout=timeout, raise_on_failure=raise_on_failure)
        except (FutureCancelledError, CommClosedError) as exc:
            # the loss shows as a cancelled future, or (when it drops while results are gathered) a closed comm
            if isinstance(exc, FutureCancelledError) and exc.reason != "scheduler-connection-lost":
                raise
            raise StackError(f"the Dask scheduler at {self.scheduler} went away mid-run; start it and its workers "
                             "again and rerun: tasks that finished come back from the cache") from None
        except KilledWorker as exc:  # Dask's message is one line already; a MergeplanError prints without traceback
            raise StackError(f"{exc} Rerun once the cause is fixed: tasks that finished come back from the "
                             "cache") from None


@dataclass(frozen=True)
class ResourceWait:
    """A submitted task that needs worker resources, until it is done."""

    future: PrefectDaskFuture
    name: str
    resources: dict[str, float]


class ClusterTaskRunner(DaskTaskRunner):
    """prefect-dask's runner on a running scheduler (`dask scheduler`), which must answer when a flow run starts:
    within CONNECT_TIMEOUT_S, else the run fails with one line. While a task waits for a resource that no worker
    declares, the run says so every REPORT_S seconds (a worker that declares it may join later: the task then runs)."""

    _RUN_STATE = ("_waiting", "_lock", "_stopped", "_run_logger")

    def __init__(self, address: str, report_s: float = 60.0):
        super().__init__(address=address, client_kwargs={"timeout": CONNECT_TIMEOUT_S})
        self.report_s = report_s
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._waiting: list[ResourceWait] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._run_logger = self.logger

    def __getstate__(self) -> dict[str, Any]:
        # The flow, this runner with it, goes to the workers with every task: locks and loggers do not pickle.
        return {name: value for name, value in self.__dict__.items() if name not in self._RUN_STATE}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_run_state()

    def duplicate(self) -> ClusterTaskRunner:
        return type(self)(self.address, self.report_s)

    def __enter__(self) -> ClusterTaskRunner:
        super().__enter__()
        if _in_dask_worker():
            return self  # a task's context on a worker: it connects only if the task submits tasks of its own
        try:
            workers = self.client.scheduler_info()["workers"]
        except (OSError, TimeoutError) as exc:
            super().__exit__(None, None, None)
            raise StackError(f"the Dask scheduler at {self.address} does not answer within {CONNECT_TIMEOUT_S:g} s; "
                             "start it (`dask scheduler`) and its workers, or fix runner.address in the pipeline "
                             "YAML") from exc
        self.logger.info("Dask scheduler %s: %s", self.address, describe_workers(workers))
        threading.Thread(target=self._report_waits, name="mergeplan-dask-waits", daemon=True).start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stopped.set()
        super().__exit__(*exc_info)

    def submit(self, task, parameters, wait_for=None, dependencies=None) -> _ClusterFuture:
        submitted = super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)
        future = _ClusterFuture(task_run_id=submitted.task_run_id, wrapped_future=submitted.wrapped_future)
        future.scheduler = self.address
        resources = dask.get_annotations().get("resources")
        if resources:
            context = FlowRunContext.get()
            if context is not None and context.flow_run is not None:
                self._run_logger = flow_run_logger(context.flow_run, context.flow)
            with self._lock:
                self._waiting.append(ResourceWait(future, task.name, dict(resources)))
        return future

    def _report_waits(self) -> None:
        while not self._stopped.wait(self.report_s):
            with self._lock:
                self._waiting = [w for w in self._waiting if not w.future.wrapped_future.done()]
                waiting = list(self._waiting)
            if not waiting:
                continue
            try:
                workers = self.client.scheduler_info()["workers"]
            except (OSError, TimeoutError):
                continue  # the scheduler is gone: the futures say so
            for line in unmet_resources(waiting, workers, self.address):
                self._run_logger.warning(line)


def _in_dask_worker() -> bool:
    try:
        get_worker()
    except ValueError:
        return False
    return True


def unmet_resources(waiting: list[ResourceWait], workers: dict[str, dict[str, Any]], address: str) -> list[str]:
    """One line per resource need that no worker of the cluster declares, naming the tasks that wait for it."""
    needs: dict[tuple[tuple[str, float], ...], list[str]] = {}
    for item in waiting:
        needs.setdefault(tuple(sorted(item.resources.items())), []).append(item.name)
    lines = []
    for need, names in needs.items():
        if any(all((worker.get("resources") or {}).get(name, 0) >= amount for name, amount in need)
               for worker in workers.values()):
            continue
        wanted = ",".join(f"{name}={amount:g}" for name, amount in need)
        lines.append(f"waiting for a Dask worker with {wanted}: {len(names)} task(s) ({', '.join(sorted(set(names)))}) "
                     f"need it and none of the {len(workers)} workers of {address} declares it; start one with "
                     f"`dask worker {address} --resources {wanted}`")
    return lines


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
