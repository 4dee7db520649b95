"""Whole flow runs survive a crash of each service. A merge-pipeline run and an on-new-expert run (started by
`mergeplan reconcile`) are frozen once the law is fitted on their new point (fetch, merge, evaluate and upload
done and cached; the registration and the logging still to come), the S3, MLflow or Prefect server is killed
with SIGKILL, and the run goes on against the dead server and fails. After the server is started again, the
same command finishes: what had finished comes from the cache, no merged model is registered twice, nothing
half-uploaded is visible, the champion's files are all there, and the new expert is merged (not lost).

Slow (about 20 s per case on 2 cores): `make test-slow` runs these.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import psutil
import pytest
import yaml
from mlflow import MlflowClient
from pipeline.mlops_support import stack_settings
from pipeline.pipeline_support import BASE, PIPELINE_DOMAINS, pipeline_config, store_expert, store_zoo
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL, temporary_settings

from infra import stack
from infra.manifest import MANIFEST
from infra.registry import CHAMPION, HEAD, MERGE_KEY, head_version, merged_model_name
from infra.s3 import download_folder, s3_client
from infra.settings import Settings
from tasks.fetch import merged_experts
from tasks.pipeline_state import untaken_experts

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[2]
SERVICES = ["s3", "mlflow", "prefect"]
# Stages whose results a rerun takes from the cache when they finished before the crash.
FINISHED_STAGES = ("fetch", "merge", "add", "evaluate", "upload", "fit")  # "add NAME": an incremental merge


@pytest.fixture(scope="module")
def services(tmp_path_factory, tiny_zoo) -> Iterator[Settings]:
    """S3 on disk (SeaweedFS: a killed moto would take the data with it), MLflow and Prefect, the zoo stored."""
    settings = stack_settings(tmp_path_factory.mktemp("faults"), s3_server="seaweedfs")
    stack.up(settings, SERVICES)
    try:
        with mock.patch.dict(os.environ, settings.as_env()):
            store_zoo(tiny_zoo, PIPELINE_DOMAINS, settings)
        yield settings
    finally:
        stack.down(settings, SERVICES)


def cli(settings: Settings, *args: object) -> subprocess.Popen:
    env = {**settings.as_env(), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           "PREFECT_HOME": str(settings.state_dir / "prefect-client")}
    return subprocess.Popen([sys.executable, "-m", "mergeplan.cli", *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finished(run: subprocess.Popen, timeout_s: float = 300) -> tuple[int, str, str]:
    out, err = run.communicate(timeout=timeout_s)
    return run.returncode, out, err


def fits(settings: Settings) -> set[str]:
    """The cache records of finished law fits: one is written when a fit-law task's result is persisted."""
    results = settings.state_dir / "results"
    return {p.name for p in results.glob("fit-law-*")} if results.is_dir() else set()


def kill_service(settings: Settings, name: str) -> None:
    pid = json.loads((settings.stack_dir / f"{name}.pid").read_text())["pid"]
    os.killpg(pid, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(pid)], timeout=10)


def crash_after_the_fit(run: subprocess.Popen, settings: Settings, service: str) -> None:
    """Freeze RUN once it has a new law fit cached, SIGKILL SERVICE, and let RUN go on against the dead one."""
    before = fits(settings)
    deadline = time.monotonic() + 240
    while fits(settings) == before:
        assert run.poll() is None, f"the run ended before its fit was cached: {run.communicate()}"
        assert time.monotonic() < deadline, "no fit was cached within 240 s"
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGSTOP)
    kill_service(settings, service)
    os.killpg(run.pid, signal.SIGCONT)


def newest_task_states(settings: Settings, flow_name: str) -> dict[str, str]:
    """Task run name -> state name, of the newest run of FLOW_NAME."""
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}), \
            get_client(sync_client=True) as client:
        [newest] = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                         sort=FlowRunSort.START_TIME_DESC, limit=1)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[newest.id])))
    return {run.name: run.state.name for run in runs}


def assert_nothing_lost(settings: Settings, tmp_path: Path) -> None:
    """One version per merge; every version's files complete and verified; half-uploads referenced by none."""
    client = MlflowClient(settings.mlflow_tracking_uri)
    versions = client.search_model_versions(f"name = '{merged_model_name(BASE)}'")
    keys = [v.tags[MERGE_KEY] for v in versions]
    assert versions and len(keys) == len(set(keys)), keys
    for v in versions:  # download_folder checks every file's sha256 and size against the manifest
        assert (download_folder(v.source, tmp_path / f"v{v.version}", settings=settings) / "config.json").is_file()
    sources = {v.source.rstrip("/") for v in versions}
    for alias in (CHAMPION, HEAD):
        assert client.get_model_version_by_alias(merged_model_name(BASE), alias).source.rstrip("/") in sources
    s3 = s3_client(settings)
    listed = s3.list_objects_v2(Bucket=settings.bucket, Prefix=f"merged/{BASE}/", Delimiter="/")
    for prefix in (p["Prefix"] for p in listed.get("CommonPrefixes", [])):
        uri = f"s3://{settings.bucket}/{prefix.rstrip('/')}"
        complete = s3.list_objects_v2(Bucket=settings.bucket, Prefix=prefix + MANIFEST)["KeyCount"] > 0
        assert complete or uri not in sources, f"{uri} is registered without its manifest"


def cached_stages(states: dict[str, str]) -> dict[str, str]:
    return {name: state for name, state in states.items() if re.split("[ -]", name)[0] in FINISHED_STAGES}


@pytest.mark.parametrize("service", SERVICES)
def test_a_merge_pipeline_run_killed_midway_is_finished_by_its_rerun(services, tiny_zoo, service, tmp_path):
    # a lambda of its own: this case's merge and evaluation are new, not cached by another case
    config = pipeline_config(tiny_zoo, params={"lambda": 0.2 + 0.01 * (SERVICES.index(service) + 1)})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config.as_parameters()))
    run = cli(services, "run", path)
    crash_after_the_fit(run, services, service)
    status, out, err = finished(run)
    assert status != 0 and "Traceback" not in err.splitlines()[-1], (out, err)

    stack.up(services, [service])
    status, out, err = finished(cli(services, "run", path))
    assert status == 0, err
    assert out.startswith("merged 3 experts") and "merged.zoo-base version" in out
    stages = cached_stages(newest_task_states(services, "merge-pipeline"))
    assert stages and set(stages.values()) == {"Cached"}, stages
    assert_nothing_lost(services, tmp_path)


@pytest.mark.parametrize("service", SERVICES)
def test_an_on_new_expert_run_killed_midway_is_finished_by_reconcile(services, tiny_zoo, service, tmp_path):
    config = pipeline_config(tiny_zoo)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config.as_parameters()))
    if head_version(BASE, settings=services) is None:
        assert finished(cli(services, "run", path))[0] == 0  # a head to add to
    newcomers = sorted({p.name for p in (tiny_zoo / "experts").iterdir()} - set(PIPELINE_DOMAINS))
    domain = newcomers[SERVICES.index(service)]
    with mock.patch.dict(os.environ, services.as_env()):
        store_expert(tiny_zoo, domain, services)  # registered with nothing listening: reconcile finds it

    run = cli(services, "reconcile", path)
    crash_after_the_fit(run, services, service)
    status, out, err = finished(run)
    assert status != 0, (out, err)

    stack.up(services, [service])
    status, out, err = finished(cli(services, "reconcile", path))
    assert status == 0, err
    held = {ref.domain for ref in merged_experts(head_version(BASE, settings=services))}
    if f"not yet merged: expert.{BASE}.{domain}" in out:  # the rerun merges it, from the cache
        stages = cached_stages(newest_task_states(services, "on-new-expert"))
        assert stages and set(stages.values()) == {"Cached"}, stages
    else:  # killed after it registered the merge (S3 failed only the artifacts): the head already holds it
        assert "nothing to reconcile" in out and domain in held, out
    assert not untaken_experts(config.experiment_name, config.base.name, services)  # the registration was not lost
    assert_nothing_lost(services, tmp_path)
    status, out, _ = finished(cli(services, "reconcile", path))
    assert status == 0 and "nothing to reconcile" in out
