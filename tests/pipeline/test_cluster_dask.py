"""The flows on a Dask cluster of separate processes (`dask scheduler`, `dask worker`s with their own folders, on
loopback), against the real S3, MLflow and Prefect servers: the sweep's table as in one process, a worker or the
scheduler lost midway, an address that does not answer, and work that needs a GPU worker."""

from __future__ import annotations

import contextvars
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import distributed
import pytest
import yaml
from dask_support import TASK_MODULES, LoopbackCluster
from mlflow import MlflowClient
from mlops_support import free_port
from pipeline_support import BASE, PIPELINE_DOMAINS, pipeline_config
from prefect import flow, task

from flows.merge_pipeline import merge_pipeline
from flows.pipeline_config import load_pipeline_config
from flows.runtime import ClusterTaskRunner, configured, needing
from flows.scaling_sweep import scaling_sweep
from infra.errors import StackError
from infra.s3 import data_uri, expert_uri, upload_data
from infra.settings import Settings
from merging.errors import ConfigError
from merging.sweep.table import read_table
from tasks.merge import GPU, MergeJob

pytestmark = pytest.mark.cluster

METHODS = ["average", "task_arithmetic"]
SUBSETS = 14  # balanced design over M = 3: 3 subsets at k = 1 and 2, one at k = 3; per method
FLOW_TIMEOUT_S = 900  # a loaded 2-core machine


@pytest.fixture(scope="module")
def stored_data(pipeline_env, tiny_zoo) -> str:
    """The evaluation data in the store: the workers fetch it from S3, as they fetch the base and the experts."""
    upload_data(tiny_zoo / "data", data_uri(pipeline_env), settings=pipeline_env)
    return data_uri(pipeline_env)


def sweep_config(tiny_zoo, settings: Settings, data: str, runner: dict):
    return pipeline_config(tiny_zoo, experts=[expert_uri(BASE, d, settings) for d in PIPELINE_DOMAINS], data=data,
                           sweep={"methods": METHODS, "design": "balanced", "eval_examples": 4}, runner=runner)


def run_sweep_flow(config, settings: Settings, state: Path):
    """The sweep flow with its task results under STATE/results (a fresh folder: nothing cached from another
    test)."""
    return configured(scaling_sweep, config.runner, settings.model_copy(update={"state_dir": state}))(config)


@pytest.fixture(scope="module")
def threads_table(pipeline_env, tiny_zoo, stored_data, tmp_path_factory) -> dict[str, list]:
    """The sweep's table measured by the thread runner in this process: what every cluster run must give."""
    config = sweep_config(tiny_zoo, pipeline_env, stored_data, {"kind": "threads"})
    return read_table(run_sweep_flow(config, pipeline_env, tmp_path_factory.mktemp("threads")).table)


@pytest.fixture()
def cluster(pipeline_env, tmp_path) -> Iterator[LoopbackCluster]:
    """A scheduler and two workers, a and b, with mergeplan's task modules and this one's imported."""
    cluster = LoopbackCluster(tmp_path / "cluster", pipeline_env, preload=(*TASK_MODULES, __name__))
    try:
        cluster.start_scheduler()
        cluster.start_worker("a")
        cluster.start_worker("b")
        cluster.wait_for_workers(2)
        yield cluster
    finally:
        cluster.close()


class InBackground:
    """A call run on a thread with this thread's context (the Prefect test server's settings are context-local)."""

    def __init__(self, call: Callable[[], object]):
        self.result: object = None
        self.error: BaseException | None = None
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._run, call), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self.result = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def join(self, timeout_s: float = FLOW_TIMEOUT_S) -> object:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"still running after {timeout_s} s"
        return self.result


def measured_subsets(state: Path) -> dict[str, str]:
    """The sweep-merge results persisted by a run_sweep_flow of STATE: file name -> the worker (host:pid) that
    measured it."""
    found = {}
    for path in (state / "results").glob("sweep-merge-*"):
        try:
            found[path.name] = json.loads(path.read_text())["result"]
        except (ValueError, KeyError):
            continue  # being written
    return {name: json.loads(result)["data"]["worker"] for name, result in found.items()}


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def assert_one_row_each(table: dict[str, list], reference: dict[str, list]) -> None:
    keys = list(zip(table["method"], table["subset"], table["domain"], strict=True))
    assert len(keys) == len(set(keys)) == SUBSETS * len(set(reference["domain"]))
    assert table == reference  # every column, every float bit for bit


def test_sweep_on_two_workers_gives_the_single_process_table_bit_for_bit(pipeline_env, tiny_zoo, stored_data,
                                                                          threads_table, cluster, tmp_path):
    config = sweep_config(tiny_zoo, pipeline_env, stored_data, {"kind": "dask", "address": cluster.address})
    outcome = run_sweep_flow(config, pipeline_env, tmp_path / "state")
    assert outcome.merges == SUBSETS
    assert_one_row_each(read_table(outcome.table), threads_table)
    assert cluster.listening_hosts() == {"127.0.0.1"}
    workers = set(measured_subsets(tmp_path / "state").values())
    assert len(workers) == 2  # both workers measured subsets, in their own processes
    for name in ("a", "b"):  # each fetched the base, the experts and the data from S3 into its own cache
        assert len(list((cluster.state_dir(name) / "cache").glob("folders/[!.]*"))) == 1 + len(PIPELINE_DOMAINS) + 1
    client = MlflowClient(pipeline_env.mlflow_tracking_uri)
    experiment = client.get_run(outcome.run_id).info.experiment_id
    nested = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{outcome.run_id}'", max_results=1000)
    assert len(nested) == SUBSETS


def test_a_worker_killed_mid_sweep_leaves_the_sweep_to_the_other(pipeline_env, tiny_zoo, stored_data, threads_table,
                                                                 cluster, tmp_path):
    config = sweep_config(tiny_zoo, pipeline_env, stored_data, {"kind": "dask", "address": cluster.address})
    state = tmp_path / "state"
    run = InBackground(lambda: run_sweep_flow(config, pipeline_env, state))
    wait_until(lambda: len(measured_subsets(state)) >= 2, FLOW_TIMEOUT_S, "two measured subsets")
    cluster.kill(cluster.workers["a"])
    outcome = run.join()
    assert run.error is None, run.error
    assert_one_row_each(read_table(outcome.table), threads_table)
    assert len(measured_subsets(state)) == SUBSETS


def test_the_scheduler_gone_is_one_line_and_a_rerun_resumes_from_the_finished_subsets(
        pipeline_env, tiny_zoo, stored_data, threads_table, cluster, tmp_path):
    config = sweep_config(tiny_zoo, pipeline_env, stored_data, {"kind": "dask", "address": cluster.address})
    state = tmp_path / "state"
    run = InBackground(lambda: run_sweep_flow(config, pipeline_env, state))
    wait_until(lambda: len(measured_subsets(state)) >= 3, FLOW_TIMEOUT_S, "three measured subsets")
    cluster.kill(cluster.scheduler)
    run.join()
    assert isinstance(run.error, StackError), repr(run.error)
    message = str(run.error)
    assert "\n" not in message and f"the Dask scheduler at {cluster.address} went away mid-run" in message
    for worker in list(cluster.workers.values()):  # what the workers finished after that is kept too
        cluster.kill(worker)
    finished = measured_subsets(state)
    assert 3 <= len(finished) < SUBSETS

    again = LoopbackCluster(cluster.root, pipeline_env)  # the same workers' folders, a new scheduler
    try:
        again.start_scheduler()
        again.start_worker("a")
        again.start_worker("b")
        again.wait_for_workers(2)
        rerun = sweep_config(tiny_zoo, pipeline_env, stored_data, {"kind": "dask", "address": again.address})
        outcome = run_sweep_flow(rerun, pipeline_env, state)
    finally:
        again.close()
    assert_one_row_each(read_table(outcome.table), threads_table)
    after = measured_subsets(state)
    assert len(after) == SUBSETS
    assert {name: after[name] for name in finished} == finished  # not measured again: the same worker's result
    assert set(after.values()) - set(finished.values())  # the rest by the new workers


def test_a_scheduler_that_does_not_answer_is_one_line_within_10_s(pipeline_env, prefect_api_url, tiny_zoo,
                                                                  stored_data, tmp_path, run_cli, monkeypatch):
    address = f"tcp://127.0.0.1:{free_port()}"
    path = tmp_path / "pipeline.yaml"
    config = sweep_config(tiny_zoo, pipeline_env, stored_data, {"kind": "dask", "address": address})
    path.write_text(yaml.safe_dump(config.as_parameters()))
    monkeypatch.setenv("MERGEPLAN_PREFECT_API_URL", prefect_api_url)
    started = time.monotonic()
    status, out, err = run_cli("run", path, "--flow", "scaling-sweep")
    seconds = time.monotonic() - started
    assert status == 2 and seconds < 10, (status, seconds)
    assert err.splitlines()[-1] == (f"error: the Dask scheduler at {address} does not answer within 5 s; start it "
                                    "(`dask scheduler`) and its workers, or fix runner.address in the pipeline YAML")
    assert "Traceback" not in out + err


def test_an_address_that_is_no_scheduler_address_is_one_line(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"base": {"name": BASE}, "method": "ties", "data": "data",
                                    "runner": {"kind": "dask", "address": "http://127.0.0.1:8786"}}))
    with pytest.raises(ConfigError) as refused:
        load_pipeline_config(path)
    assert str(refused.value) == (f"{path}: runner.address: 'http://127.0.0.1:8786' is not a Dask scheduler address; "
                                  "write tcp://HOST:PORT (`dask scheduler` prints it)")


@task(name="where-am-i")
def worker_name() -> str:
    return distributed.get_worker().name


@flow(name="needs-a-gpu")
def gpu_flow() -> str:
    with needing({GPU: 1}):
        future = worker_name.submit()
    return future.result()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_gpu_work_waits_for_a_gpu_worker_and_says_so(pipeline_env, prefect_api_url, cluster):
    lines = Lines()
    logging.getLogger("prefect.flow_runs").addHandler(lines)
    try:
        run = InBackground(gpu_flow.with_options(task_runner=ClusterTaskRunner(cluster.address, report_s=1)))
        waiting = [f"waiting for a Dask worker with GPU=1: 1 task(s) (where-am-i) need it and none of the 2 workers of "
                   f"{cluster.address} declares it; start one with `dask worker {cluster.address} --resources GPU=1`"]
        wait_until(lambda: [line for line in lines.lines if line in waiting][1:], 120, "two waiting lines")
        assert run.thread.is_alive()
        cluster.start_worker("gpu", resources="GPU=1")
        assert run.join() == "gpu" and run.error is None
    finally:
        logging.getLogger("prefect.flow_runs").removeHandler(lines)


def test_a_calibration_on_cuda_needs_a_gpu_worker():
    def job(method: str, **params) -> MergeJob:
        return MergeJob.model_validate({"base": {"ref": {"name": "b", "domain": "base", "uri": "/b", "sha256": "0"},
                                                 "path": "/b"}, "experts": [], "method": method, "params": params,
                                        "seed": 0})
    assert job("expert_merging", device="cuda").resources == {GPU: 1}
    assert job("expert_merging_pp", device="cuda:1").resources == {GPU: 1}
    assert job("expert_merging").resources == job("expert_merging", device="cpu").resources == {}
    assert job("ties", device="cuda").resources == {}  # not a calibration: the param is not its


def test_merge_pipeline_measures_its_prefix_points_on_the_workers(pipeline_env, tiny_zoo, stored_data, cluster,
                                                                  tmp_path):
    config = pipeline_config(tiny_zoo, data=stored_data, law={"min_gain": 0.001, "prefix_points": [1, 2]},
                             runner={"kind": "dask", "address": cluster.address})
    outcome = configured(merge_pipeline, config.runner, pipeline_env.model_copy(update={"state_dir": tmp_path}))(config)
    assert not math.isnan(outcome.macro_ce)
    client = MlflowClient(pipeline_env.mlflow_tracking_uri)
    experiment = client.get_run(outcome.run_id).info.experiment_id
    nested = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{outcome.run_id}'")
    assert sorted(r.data.metrics["experts"] for r in nested) == [1, 2]
    for run in nested:  # merged on a worker, from inputs it fetched into its own cache
        key = run.data.tags["mergeplan.merge_key"]
        assert [name for name in ("a", "b") if (cluster.state_dir(name) / "work" / "merges" / key).is_dir()]
