"""A Dask cluster of separate processes on loopback for the cluster tests and the benchmark: `dask scheduler` and
`dask worker`s started as subprocesses (not a LocalCluster), each worker in its own session (SIGKILL of the group
takes its nanny too: the machine is gone), with its own Dask local directory and its own mergeplan state folder
(download cache and work folders), reaching S3 with the settings it is given."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from distributed import Client

from infra.settings import Settings
from infra.stack import free_port_block

REPO = Path(__file__).resolve().parents[2]
DASK = Path(sys.executable).with_name("dask")
START_TIMEOUT_S = 180  # a worker imports torch and prefect: slow on a loaded machine
# Without a dashboard Dask still serves its HTTP routes (health, metrics), on every interface unless told otherwise.
LOOPBACK_HTTP = ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
# The scheduler unpickles every submitted task, importing its module (torch, transformers, prefect): done at the first
# submission on a loaded machine, that blocks it past the client's 30 s TCP timeout, which then takes it for gone.
TASK_MODULES = ("tasks.sweep", "tasks.evaluate")


class LoopbackCluster:
    def __init__(self, root: Path, settings: Settings, preload: tuple[str, ...] = TASK_MODULES):
        self.root, self.settings = root, settings
        self.preload = [arg for module in preload for arg in ("--preload", module)]
        self.port = free_port_block(1)
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as log:
            return subprocess.Popen([str(DASK), *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def _env(self) -> dict[str, str]:
        # tests/ and tests/pipeline: the test modules' own tasks are pickled by reference
        path = os.pathsep.join([str(REPO), str(REPO / "tests"), str(REPO / "tests" / "pipeline")])
        return {**os.environ, "PYTHONPATH": path}

    def start_scheduler(self) -> str:
        self.scheduler = self._start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                                   *LOOPBACK_HTTP, *self.preload], self._env())
        self.wait_for_workers(0)
        return self.address

    def start_worker(self, name: str, resources: str | None = None) -> subprocess.Popen:
        """A worker (with its nanny) named NAME, with one thread and its own folders under ROOT/NAME."""
        folder = self.root / name
        state = folder / "state"
        env = self._env() | self.settings.as_env() | {"MERGEPLAN_STATE_DIR": str(state),
                                                      "MERGEPLAN_CACHE_DIR": str(state / "cache"),
                                                      "PREFECT_HOME": str(folder / "prefect")}
        args = ["worker", self.address, "--name", name, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
                "--local-directory", str(folder / "dask"), *LOOPBACK_HTTP, *self.preload]
        if resources:
            args += ["--resources", resources]
        self.workers[name] = self._start(name, args, env)
        return self.workers[name]

    def state_dir(self, worker: str) -> Path:
        return self.root / worker / "state"

    def wait_for_workers(self, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with Client(self.address, timeout=5) as client:
                    if count:
                        client.wait_for_workers(count, timeout=max(1.0, deadline - time.monotonic()))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def listening_hosts(self) -> set[str]:
        """The addresses every socket of the scheduler, the workers and their children listens on."""
        hosts = set()
        for process in [self.scheduler, *self.workers.values()]:
            parent = psutil.Process(process.pid)
            for member in [parent, *parent.children(recursive=True)]:
                hosts |= {c.laddr.ip for c in member.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        return hosts

    def kill(self, process: subprocess.Popen) -> None:
        """SIGKILL the process and its children (a worker's nanny and worker), as a lost machine would."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def close(self) -> None:
        for process in [*self.workers.values(), *([self.scheduler] if self.scheduler else [])]:
            self.kill(process)
        self.workers.clear()
        self.scheduler = None
