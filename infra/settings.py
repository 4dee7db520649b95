"""Every setting of the stack and the pipeline's I/O, read from environment variables in one place.

Unset URLs point at the local stack of `mergeplan up` (loopback, the ports below); production sets the URLs and
credentials instead, with the same code. The variables are documented in infra/README.md.

Credentials are SecretStr: repr() and str() show '**********', so printing or logging a Settings leaks nothing.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

LOOPBACK = "127.0.0.1"
ENV_PREFIX = "MERGEPLAN_"
# Credentials keep the names every AWS tool reads, so one set of variables serves boto3, the CLI and MLflow.
AWS_ENV = {"aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
           "aws_session_token": "AWS_SESSION_TOKEN"}
# The local S3's keys when none are set: the SeaweedFS server of `up` is started with them (moto takes any).
LOCAL_S3_KEY = "mergeplan-local"
# Ports after MERGEPLAN_S3_PORT that the SeaweedFS server's own components take (master, volume, filer, admin).
S3_INTERNAL_PORTS = 9
WEBHOOK_PATH = "/mlflow-webhook"
# In start-up order: MLflow and Prefect migrate their schemas into the database as they start.
SERVICES = ("s3", "postgres", "mlflow", "prefect", "webhook")
URL_FIELDS = {"s3": "s3_endpoint", "mlflow": "mlflow_tracking_uri", "prefect": "prefect_api_url",
              "webhook": "webhook_url"}


def env_name(field: str) -> str:
    """The environment variable that sets FIELD."""
    return AWS_ENV.get(field, ENV_PREFIX + field.upper())


def local_url(service: str, port: int | str) -> str:
    """Where SERVICE listens when `mergeplan up` runs it on PORT."""
    suffix = {"s3": "", "mlflow": "", "prefect": "/api", "webhook": WEBHOOK_PATH}[service]
    return f"http://{LOOPBACK}:{port}{suffix}"


class Settings(BaseModel):
    """The resolved settings; build with Settings.from_env(), or directly in tests."""

    # hide_input_in_errors: a rejected value may be a credential (a database URL with its password)
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    state_dir: Path = Path(".mergeplan")
    s3_port: int = Field(9000, ge=1, le=65535 - S3_INTERNAL_PORTS)
    # seaweedfs: on disk under STATE/s3, survives down/up and kill -9; moto: in memory, for tests
    s3_server: Literal["seaweedfs", "moto"] = "seaweedfs"
    mlflow_port: int = Field(5000, ge=1, le=65535)
    prefect_port: int = Field(4200, ge=1, le=65535)
    webhook_port: int = Field(8787, ge=1, le=65535)
    # 5432 is left to a system PostgreSQL, which the distributions' packages start there
    postgres_port: int = Field(5433, ge=1, le=65535)
    # MLflow's and Prefect's database: sqlite (a file each in STATE), postgres (a local PostgreSQL cluster in
    # STATE/postgres that `up` runs) or postgresql://USER@HOST:PORT (that server); on PostgreSQL they use the
    # databases mlflow and prefect
    db: str = "sqlite"
    # the database user's password, never in the URL; unset: generated once for the local cluster, ~/.pgpass (read
    # by libpq and asyncpg themselves) for a given server
    db_password: SecretStr | None = None
    # None means AWS itself (boto3's default endpoint for the region).
    s3_endpoint: str | None
    aws_region: str = "us-east-1"
    bucket: str = Field("mergeplan", min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]+[a-z0-9]$")
    mlflow_tracking_uri: str
    # basic: the local MLflow server runs its basic-auth app, admin = MLFLOW_TRACKING_USERNAME / _PASSWORD
    mlflow_auth: Literal["none", "basic"] = "none"
    # basic: the local Prefect server requires PREFECT_API_AUTH_STRING (user:password), which every Prefect client
    # (flows, serve, the receiver's events client) reads from the environment and sends
    prefect_auth: Literal["none", "basic"] = "none"
    prefect_api_url: str
    webhook_url: str
    # Loopback unless the receiver runs in a container that MLflow reaches over a network (0.0.0.0 there).
    webhook_host: str = LOOPBACK
    webhook_secret: SecretStr | None = None
    webhook_max_age_s: float = Field(300, gt=0)
    cache_dir: Path
    cache_max_gb: float = Field(50, gt=0)  # the download cache's limit: least recently used folders go first
    work_max_gb: float = Field(20, gt=0)  # STATE/work's limit (merged models, accumulators, sweeps), the same way
    s3_attempts: int = Field(5, ge=1)
    s3_backoff_s: float = Field(0.5, ge=0)
    s3_connect_timeout_s: float = Field(5, gt=0)
    transfer_threads: int = Field(8, ge=1)
    multipart_chunk_mb: int = Field(16, ge=5)
    mlflow_timeout_s: float = Field(3, gt=0)
    startup_timeout_s: float = Field(120, gt=0)
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None

    @field_validator("db")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if value in ("sqlite", "postgres"):
            return value
        parts = urlsplit(value)
        if parts.scheme != "postgresql" or not parts.hostname:
            raise ValueError("choose sqlite, postgres (a local PostgreSQL) or a server, postgresql://USER@HOST:PORT")
        if parts.password is not None:
            raise ValueError("the URL carries a password: put it in MERGEPLAN_DB_PASSWORD (or ~/.pgpass) instead, "
                             "where it is never printed")
        if parts.path.strip("/") or parts.query:
            raise ValueError("name the server alone, postgresql://USER@HOST:PORT: MLflow and Prefect use its "
                             "databases mlflow and prefect")
        return value.rstrip("/")

    @model_validator(mode="before")
    @classmethod
    def _local_defaults(cls, data: Any) -> Any:
        """Fill each unset URL with the local stack's, so that only production needs to name them."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for service, url_field in URL_FIELDS.items():
            port = data.get(f"{service}_port") or cls.model_fields[f"{service}_port"].default
            data.setdefault(url_field, local_url(service, port))
        data["s3_endpoint"] = data["s3_endpoint"] or None
        data.setdefault("cache_dir", Path(data.get("state_dir") or cls.model_fields["state_dir"].default) / "cache")
        return data

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from MERGEPLAN_<FIELD> variables and the standard AWS ones; a bad value raises ValidationError."""
        environ = os.environ if environ is None else environ
        values: dict[str, str] = {}
        for field in cls.model_fields.keys() - {"aws_region"}:
            if env_name(field) in environ:
                values[field] = environ[env_name(field)]
        region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
        if region:
            values["aws_region"] = region
        return cls(**values)

    def is_local(self, service: str) -> bool:
        """Whether SERVICE (s3, postgres, mlflow, prefect, webhook) is the loopback one that `mergeplan up` runs."""
        if service == "postgres":
            return self.db == "postgres"
        return getattr(self, URL_FIELDS[service]) == local_url(service, getattr(self, f"{service}_port"))

    @property
    def s3_endpoint_name(self) -> str:
        """The S3 endpoint for messages."""
        return redact_url(self.s3_endpoint) if self.s3_endpoint else f"AWS S3 ({self.aws_region})"

    def s3_client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for boto3.client('s3'); without explicit keys boto3 uses its own credential chain."""
        kwargs: dict[str, Any] = {"endpoint_url": self.s3_endpoint, "region_name": self.aws_region}
        keys = {field: getattr(self, field) for field in AWS_ENV}
        if keys["aws_access_key_id"] and keys["aws_secret_access_key"]:
            kwargs.update({field: value.get_secret_value() for field, value in keys.items() if value})
        elif self.is_local("s3"):
            kwargs.update(aws_access_key_id=LOCAL_S3_KEY, aws_secret_access_key=LOCAL_S3_KEY)
        return kwargs

    def as_env(self) -> dict[str, str]:
        """These settings as environment variables, for a child process that calls Settings.from_env()."""
        env = {}
        for field, value in self:
            if value is None or field == "aws_region":
                continue
            env[env_name(field)] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        env["AWS_DEFAULT_REGION"] = self.aws_region
        if self.s3_endpoint is None:
            env[env_name("s3_endpoint")] = ""
        return env

    @property
    def stack_dir(self) -> Path:
        """Pid files, logs and generated keys of the local stack."""
        return self.state_dir / "stack"

    @property
    def s3_data_dir(self) -> Path:
        """Where the local SeaweedFS server keeps every object."""
        return self.state_dir / "s3"

    @property
    def postgres_data_dir(self) -> Path:
        """The local PostgreSQL cluster (MERGEPLAN_DB=postgres)."""
        return self.state_dir / "postgres"


def resolve_webhook_secret(settings: Settings) -> str:
    """MERGEPLAN_WEBHOOK_SECRET, or a random secret generated once and kept (mode 0600) in the stack folder."""
    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value()
    return _kept_secret(settings.stack_dir / "webhook-secret", lambda: secrets.token_urlsafe(32))


def resolve_db_password(settings: Settings) -> str | None:
    """MERGEPLAN_DB_PASSWORD; else, for the local cluster, a password generated once and kept (mode 0600) in the
    stack folder; else None: libpq and asyncpg then look in ~/.pgpass themselves."""
    if settings.db_password is not None:
        return settings.db_password.get_secret_value()
    if settings.db == "postgres":
        return _kept_secret(settings.stack_dir / "postgres-password", lambda: secrets.token_urlsafe(32))
    return None


def resolve_mlflow_encryption_key(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """The key the MLflow server encrypts webhook secrets with; it must survive restarts, else stored secrets are
    unreadable. MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY, or a Fernet key generated once and kept in the stack folder."""
    environ = os.environ if environ is None else environ
    if environ.get("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"):
        return environ["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"]
    return _kept_secret(settings.stack_dir / "mlflow-webhook-key",
                        lambda: base64.urlsafe_b64encode(os.urandom(32)).decode())


def resolve_mlflow_flask_key(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """The key the MLflow basic-auth app signs its CSRF tokens with: MLFLOW_FLASK_SERVER_SECRET_KEY, or one
    generated once and kept in the stack folder."""
    environ = os.environ if environ is None else environ
    if environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        return environ["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    return _kept_secret(settings.stack_dir / "mlflow-flask-key", lambda: secrets.token_urlsafe(32))


def _kept_secret(path: Path, generate: Callable[[], str]) -> str:
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = generate()
    # O_EXCL: when two processes race, one writes and the other reads the winner's value.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as file:
        file.write(value + "\n")
    return value


def redact_url(url: str) -> str:
    """URL without user:password@, for messages: tracking URIs may carry basic-auth credentials."""
    return _replace_userinfo(url, "***@")


def without_userinfo(url: str) -> str:
    """URL without user:password@, for requests that need no credentials (health checks)."""
    return _replace_userinfo(url, "")


def _replace_userinfo(url: str, replacement: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=replacement + parts.netloc.rpartition("@")[2]))
