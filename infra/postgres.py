"""MLflow's and Prefect's PostgreSQL: the local cluster that `mergeplan up` runs with MERGEPLAN_DB=postgres (created
by initdb in STATE/postgres), or the server MERGEPLAN_DB names; the URLs the two servers get, and their databases.

No password reaches a command line or a URL: initdb reads the first one from a 0600 file that is removed at once,
the MLflow and Prefect servers get it as PGPASSWORD in their environment (read by libpq and by asyncpg), and the
checks here pass it to connect() in this process.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from infra.errors import StackError
from infra.settings import LOOPBACK, Settings, redact_url, resolve_db_password

# The superuser initdb creates in the local cluster; MLflow and Prefect log in as it.
LOCAL_USER = "mergeplan"
DATABASES = ("mlflow", "prefect")  # one each: both keep an Alembic version table, which would collide
# PostgreSQL refuses to run as root; the distributions' packages create this user to run it.
SYSTEM_USER = "postgres"
INSTALL_HINT = "install PostgreSQL (apt-get install postgresql-15), or set MERGEPLAN_DB=sqlite"
_DEBIAN_BIN = Path("/usr/lib/postgresql")


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str | None  # None: libpq's default, the name of the user running the client

    def __str__(self) -> str:
        return f"PostgreSQL at {self.host}:{self.port}"


def server(settings: Settings) -> Server:
    """The server MLflow and Prefect use: the local cluster, or the one MERGEPLAN_DB names."""
    if settings.db == "postgres":
        return Server(LOOPBACK, settings.postgres_port, LOCAL_USER)
    parts = urlsplit(settings.db)
    return Server(parts.hostname or LOOPBACK, parts.port or 5432, parts.username)


def database_url(settings: Settings, database: str, driver: str = "") -> str:
    """DATABASE's SQLAlchemy URL, without a password (clients read PGPASSWORD or ~/.pgpass)."""
    target = server(settings)
    user = f"{quote(target.user, safe='')}@" if target.user else ""
    return f"postgresql{'+' + driver if driver else ''}://{user}{target.host}:{target.port}/{database}"


def client_env(settings: Settings) -> dict[str, str]:
    """What a database client's environment needs: the password, read by libpq and asyncpg."""
    password = resolve_db_password(settings)
    return {"PGPASSWORD": password} if password else {}


def bin_dir() -> Path | None:
    """PostgreSQL's programs: the newest of Debian's /usr/lib/postgresql/N/bin, else those on the PATH."""
    versions = sorted((p for p in _DEBIAN_BIN.glob("*/bin") if p.parent.name.isdigit()),
                      key=lambda p: int(p.parent.name)) if _DEBIAN_BIN.is_dir() else []
    if versions:
        return versions[-1]
    found = shutil.which("postgres")
    return Path(found).parent if found else None


def binary(name: str) -> str:
    folder = bin_dir()
    return str(folder / name) if folder else name


def server_user() -> tuple[int, int] | None:
    """(uid, gid) that initdb and the server run as when this process is root (PostgreSQL refuses root), else None:
    they run as this process's user."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(SYSTEM_USER)
        return entry.pw_uid, entry.pw_gid
    return None


def as_user(run_as: tuple[int, int] | None) -> dict[str, Any]:
    """subprocess keyword arguments that run a child as RUN_AS, with no supplementary group of ours."""
    return {"user": run_as[0], "group": run_as[1], "extra_groups": []} if run_as else {}


def init_cluster(settings: Settings, log: Path) -> None:
    """Create the local cluster in STATE/postgres unless it exists: superuser LOCAL_USER with the password of
    resolve_db_password, scram-sha-256 for every connection."""
    data = settings.postgres_data_dir.resolve()
    if (data / "PG_VERSION").is_file():
        return
    run_as = server_user()
    if os.geteuid() == 0:
        _check_server_user_reaches(data.parent, run_as)
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    if run_as:
        os.chown(data, *run_as)
    password = resolve_db_password(settings)
    # initdb deletes its target folder when it fails, so the password file lives beside it
    descriptor, password_file = tempfile.mkstemp(dir=data.parent, prefix=".initdb-")
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(f"{password}\n")
        if run_as:
            os.chown(password_file, *run_as)
        argv = [binary("initdb"), "-D", str(data), "-U", LOCAL_USER, f"--pwfile={password_file}",
                "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale", "--no-instructions"]
        with open(log, "ab") as output:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                    check=False, **as_user(run_as))
    finally:
        os.unlink(password_file)
    if result.returncode != 0:
        raise StackError(f"postgres: initdb of {data} exited with status {result.returncode}; see {log}")


def _check_server_user_reaches(folder: Path, run_as: tuple[int, int] | None) -> None:
    if run_as is None:
        raise StackError(f"postgres: PostgreSQL refuses to run as root and this machine has no {SYSTEM_USER!r} user "
                         "to run it as; run mergeplan as another user, or set MERGEPLAN_DB=sqlite")
    uid, gid = run_as
    folder.mkdir(parents=True, exist_ok=True)
    for path in (folder, *folder.parents):
        mode = path.stat()
        search = stat.S_IXUSR if mode.st_uid == uid else stat.S_IXGRP if mode.st_gid == gid else stat.S_IXOTH
        if not mode.st_mode & search:
            raise StackError(f"postgres: PostgreSQL refuses to run as root, so mergeplan runs it as the "
                             f"{SYSTEM_USER!r} user, who may not enter {path} (mode {stat.S_IMODE(mode.st_mode):o}); "
                             "set MERGEPLAN_STATE_DIR to a folder that user can reach, or run mergeplan as another "
                             "user")


def is_ready(url: str) -> bool | None:
    """Whether the server at URL accepts connections (pg_isready: no login, no password); None without
    pg_isready."""
    pg_isready = binary("pg_isready")
    if shutil.which(pg_isready) is None:
        return None
    with contextlib.suppress(subprocess.TimeoutExpired):
        return subprocess.run([pg_isready, "-q", "-t", "2", "-d", url], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10).returncode == 0
    return False


def ensure_databases(settings: Settings) -> None:
    """Create MLflow's and Prefect's databases where missing. A refused login or an unreachable server is one line
    naming the database and what to do, never the password."""
    import psycopg2

    for database in DATABASES:
        try:
            connect(settings, database).close()
        except psycopg2.OperationalError as exc:
            if f'database "{database}" does not exist' not in str(exc):
                raise StackError(_refusal(settings, database, _reason(exc, settings))) from None
            _create(settings, database)


def connect(settings: Settings, database: str):
    """A psycopg2 connection to DATABASE as the configured user."""
    import psycopg2

    target, password = server(settings), resolve_db_password(settings)
    login = {"user": target.user, "password": password}
    return psycopg2.connect(host=target.host, port=target.port, dbname=database, connect_timeout=10,
                            **{key: value for key, value in login.items() if value})


def _create(settings: Settings, database: str) -> None:
    import psycopg2
    from psycopg2 import errors, sql

    try:
        connection = connect(settings, "postgres")
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with connection.cursor() as cursor, contextlib.suppress(errors.DuplicateDatabase):  # a racing `up`
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        finally:
            connection.close()
    except psycopg2.Error as exc:
        target = server(settings)
        user = target.user or "this user"
        raise StackError(f"database {database}: missing on {target} and {user} may not create it "
                         f"({_reason(exc, settings)}); create it (CREATE DATABASE {database} OWNER {user}) or grant "
                         f"{user} CREATEDB") from None


def _refusal(settings: Settings, database: str, reason: str) -> str:
    target = server(settings)
    if "password authentication failed" in reason or "no password supplied" in reason:
        if settings.db == "postgres":
            fix = ("set MERGEPLAN_DB_PASSWORD to the password the local cluster was created with, or unset it to use "
                   f"the kept one ({settings.stack_dir / 'postgres-password'})")
        else:
            fix = f"set MERGEPLAN_DB_PASSWORD to the password of {target.user or 'this user'} (or put it in ~/.pgpass)"
        return f"database {database}: {target} refused the login of {target.user or 'this user'} ({reason}); {fix}"
    fix = "start it with `mergeplan up postgres`" if settings.db == "postgres" else \
        f"check that it runs and accepts this client, or fix MERGEPLAN_DB ({redact_url(settings.db)})"
    return f"database {database}: {target} cannot be used ({reason}); {fix}"


def _reason(exc: Exception, settings: Settings) -> str:
    """The server's own words, on one line, without libpq's 'connection to server ... failed:' preamble."""
    text = " ".join(str(exc).split())
    text = re.sub(r'^connection to server at "[^"]*"(?: \([^)]*\))?, port \d+ failed: ', "", text)
    text = re.sub(r"^FATAL: +", "", text)
    password = resolve_db_password(settings)
    return text.replace(password, "***") if password else text


@contextlib.contextmanager
def enterable_temp_folder(prefix: str) -> Iterator[Path]:
    """A new temporary folder the server's user can enter (mode 0711: as root, PostgreSQL runs as `postgres`, to whom a
    mkdtemp folder, mode 0700, is closed), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
