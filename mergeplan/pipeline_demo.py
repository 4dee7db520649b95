"""`mergeplan demo` (what `make demo` runs): the orchestrated pipeline on the tiny zoo, on the local stack.

Starts the stack, builds the zoo, puts the base, the evaluation data and seven experts in S3 and registers six of
the experts in MLflow, runs merge-pipeline once, serves the deployments, registers the seventh expert, and shows
the on-new-expert run that the registration triggered (MLflow webhook -> receiver -> Prefect event -> deployment)
and its decision. The stack keeps running afterwards for the UIs; `mergeplan down` stops it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

from flows.merge_pipeline import merge_pipeline
from flows.pipeline_config import PipelineConfig
from flows.runtime import configured, prefect_api
from infra import stack
from infra.errors import StackError
from infra.registry import expert_model_name, mlflow_client, register_expert
from infra.s3 import base_uri, data_uri, expert_uri, upload_data, upload_expert
from infra.settings import Settings, redact_url
from merging.zoo.build import build_zoo
from merging.zoo.layout import expert_folders
from tasks.tracking import experiment_link

BASE = "tiny-base"
FIRST_EXPERTS = 6
TRIGGER_TIMEOUT_S = 300
# TIES at a strength whose merge of the six beats the base (macro CE 2.366 vs 2.390 on 16 examples; at λ 0.5 it
# lost to it, and the base, the zeroth champion, would have stayed the champion)
DEMO_PIPELINE = {"method": "ties", "params": {"density": 0.5, "lambda": 0.3}, "seed": 0,
                 "eval": {"max_examples": 16, "batch_size": 16},
                 # k = 1, 2, 4 as nested runs, 6 in the run itself: four points, so the law is fitted at once
                 "law": {"min_gain": 0.002, "prefix_points": [1, 2, 4]}}


def _step(text: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:5.0f} s] {text}", flush=True)


def _store(zoo: Path, settings: Settings, started: float) -> list[Path]:
    upload_expert(zoo / "base", base_uri(BASE, settings), settings=settings)
    upload_data(zoo / "data", data_uri(settings), settings=settings)
    experts = expert_folders(zoo)[:FIRST_EXPERTS + 1]
    for folder in experts:
        upload_expert(folder, expert_uri(BASE, folder.name, settings), settings=settings)
    for folder in experts[:FIRST_EXPERTS]:
        register_expert(expert_uri(BASE, folder.name, settings), folder.name, BASE, settings=settings)
    _step(f"base, data and {len(experts)} experts in {settings.s3_endpoint_name}; {FIRST_EXPERTS} registered",
          started)
    return experts


def _served_since(name: str, since: datetime) -> bool:
    """Whether a serve process (re)created deployment NAME after SINCE: one left from an earlier demo is not."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name).updated >= since
        except ObjectNotFound:
            return False


def wait_until(check, timeout_s: float, what: str):
    """CHECK's first truthy answer, polled every second; StackError after TIMEOUT_S."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(1)
    raise StackError(f"gave up after {timeout_s:.0f} s waiting for {what}")


def _triggered_run(settings: Settings, experiment: str, s3_uri: str, since_ms: int):
    client = mlflow_client(settings)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], f"tags.`mergeplan.new_expert` = '{s3_uri}' and "
                              f"attributes.start_time > {since_ms}") if found else []
    return runs[0] if runs and runs[0].info.status in ("FINISHED", "FAILED") else None


def _register_seventh(folder: Path, settings: Settings) -> tuple[str, bool]:
    """Register the seventh expert; False when an earlier demo registered it (MLflow then sends no webhook, and
    on-new-expert merged it then: each expert is merged once)."""
    uri = expert_uri(BASE, folder.name, settings)
    before = mlflow_client(settings).search_model_versions(f"name='{expert_model_name(BASE, folder.name)}'")
    registered = register_expert(uri, folder.name, BASE, settings=settings)
    return uri, all(str(v.version) != registered.version for v in before)


def run_pipeline_demo(workdir: Path) -> None:
    started = time.perf_counter()
    settings = Settings.from_env()
    for service in stack.up(settings):
        print(f"         {service.name:<8} {service.note:<16} {redact_url(service.address)}")
    _step("local stack up", started)
    # The steps print one line each; task-level logs stay in the Prefect UI.
    for name in ("mergeplan", "prefect"):
        logging.getLogger(name).setLevel(logging.WARNING)
    zoo = workdir / "zoo"
    build_zoo("tiny", zoo)
    _step(f"tiny zoo in {zoo}", started)
    experts = _store(zoo, settings, started)
    config = PipelineConfig.model_validate(DEMO_PIPELINE | {
        "base": {"name": BASE}, "data": data_uri(settings),
        "experts": [expert_uri(BASE, folder.name, settings) for folder in experts[:FIRST_EXPERTS]]})
    config_file = workdir / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(config.as_parameters(), sort_keys=False))
    with prefect_api(settings):
        outcome = configured(merge_pipeline, config.runner, settings)(config)
        _step(f"merge-pipeline: {len(outcome.experts)} experts with {config.method}, macro CE "
              f"{outcome.macro_ce:.4f}, version {outcome.version}, {outcome.verdict}; decision: "
              f"{outcome.decision.reason}", started)
        log, serve_started = workdir / "serve.log", datetime.now(UTC)
        with open(log, "w") as out:
            server = subprocess.Popen([sys.executable, "-m", "mergeplan.cli", "serve", str(config_file)],
                                      stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        try:
            wait_until(lambda: _served_since(f"on-new-expert/{BASE}", serve_started) or server.poll() is not None,
                       120, "mergeplan serve")
            if server.poll() is not None:
                raise StackError(f"demo: mergeplan serve exited; see {log}")
            _step(f"serving on-new-expert (event trigger) and scaling-sweep (nightly); log in {log}", started)
            since_ms = int(time.time() * 1000)
            uri, new = _register_seventh(experts[FIRST_EXPERTS], settings)
            how = ("registered -> MLflow webhook -> Prefect event mergeplan.expert.registered" if new else
                   "was registered and merged by an earlier demo (each expert is merged once): its run")
            _step(f"expert {experts[FIRST_EXPERTS].name} {how}", started)
            run = wait_until(lambda: _triggered_run(settings, config.experiment_name, uri, since_ms if new else 0),
                             TRIGGER_TIMEOUT_S, f"the on-new-expert run (see {log})")
        finally:
            server.terminate()
            server.wait(30)
    tags, metrics = run.data.tags, run.data.metrics
    kind = "incremental (saved accumulators + the new expert)" if tags.get("mergeplan.incremental") == "true" \
        else "full merge"
    _step(f"on-new-expert {run.info.status.lower()}: {kind}, k={metrics.get('experts', 0):.0f}, macro CE "
          f"{metrics.get('macro_ce', float('nan')):.4f}, the new head (version {tags.get('mergeplan.version')}), "
          f"{'the new' if tags.get('mergeplan.champion') == 'true' else 'not the'} champion", started)
    print(f"         decision: {tags.get('mergeplan.decision')} ({tags.get('mergeplan.reason')})")
    print(f"\nMLflow UI   {experiment_link(run.info.experiment_id, settings)}  (experiment "
          f"{config.experiment_name}; models merged.{BASE} and expert.{BASE}.*)")
    print(f"Prefect UI  {redact_url(settings.prefect_api_url).removesuffix('/api')}  (flow runs, deployments)")
    print("stop the stack with `mergeplan down`; the stack-less demo is `mergeplan demo --local`")
    _step("demo finished", started)
