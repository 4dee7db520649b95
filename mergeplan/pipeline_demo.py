"""`mergeplan demo` (what `make demo` runs): the orchestrated pipeline on the tiny zoo, on the local stack.

Starts the stack, builds the zoo, puts the base, the evaluation data and seven experts in S3 and registers six of
the experts in MLflow, runs merge-pipeline once, serves the deployments, registers the seventh expert, and shows
the on-new-expert run that the registration triggered (MLflow webhook -> receiver -> Prefect event -> deployment)
and its decision. The stack keeps running afterwards for the UIs; `mergeplan down` stops it. `--zoo real` (`make
demo-real`) does the same with SmolLM2-135M and eight of its LoRA experts, merged by Expert Merging++ at its
defaults, the ninth recalibrated warm-started by the trigger.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from flows.merge_pipeline import merge_pipeline
from flows.pipeline_config import PipelineConfig
from flows.runtime import configured, prefect_api
from infra import stack
from infra.errors import StackError
from infra.registry import expert_model_name, mlflow_client, register_expert
from infra.s3 import base_uri, data_uri, expert_uri, upload_data, upload_expert
from infra.settings import Settings, redact_url
from merging.errors import ConfigError
from merging.zoo.build import build_zoo
from merging.zoo.layout import expert_folders
from tasks.tracking import experiment_link


class DemoZoo(BaseModel):
    """What the demo runs on: a zoo, the base's name in the store, how many experts are registered before the
    first run (the next one is registered to trigger on-new-expert), and the pipeline."""

    model_config = ConfigDict(frozen=True)
    base: str
    first_experts: int
    pipeline: dict[str, Any]
    trigger_timeout_s: float
    built_by: str | None = None  # a zoo built beforehand (its folder must exist): the command that builds it
    folder: Path | None = None


DEMOS = {
    # TIES at a strength whose merge of the six beats the base (macro CE 2.366 vs 2.390 on 16 examples; at λ 0.5
    # it lost to it, and the base, the zeroth champion, would have stayed the champion)
    "tiny": DemoZoo(base="tiny-base", first_experts=6, trigger_timeout_s=300, pipeline={
        "method": "ties", "params": {"density": 0.5, "lambda": 0.3}, "seed": 0,
        "eval": {"max_examples": 16, "batch_size": 16},
        # k = 1, 2, 4 as nested runs, 6 in the run itself: four points, so the law is fitted at once
        "law": {"min_gain": 0.002, "prefix_points": [1, 2, 4]}}),
    # SmolLM2-135M and its LoRA experts, as a team would run it: Expert Merging++ at its defaults (gamma: auto),
    # then the ninth expert recalibrates warm-started. No prefix points: each would be one more calibration.
    "real": DemoZoo(base="smollm2-135m", first_experts=8, trigger_timeout_s=3600, built_by="make zoo-real",
                    folder=Path(".mergeplan/zoo-r"), pipeline={
                        "method": "expert_merging_pp", "seed": 0, "eval": {"max_examples": 24, "batch_size": 8},
                        "law": {"min_gain": 0.002}}),
}


def _step(text: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:5.0f} s] {text}", flush=True)


def _store(zoo: Path, demo: DemoZoo, settings: Settings, started: float) -> list[Path]:
    upload_expert(zoo / "base", base_uri(demo.base, settings), settings=settings)
    upload_data(zoo / "data", data_uri(settings), settings=settings)
    experts = expert_folders(zoo)[:demo.first_experts + 1]
    for folder in experts:
        upload_expert(folder, expert_uri(demo.base, folder.name, settings), settings=settings)
    for folder in experts[:demo.first_experts]:
        register_expert(expert_uri(demo.base, folder.name, settings), folder.name, demo.base, settings=settings)
    _step(f"base, data and {len(experts)} experts in {settings.s3_endpoint_name}; {demo.first_experts} registered",
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


def _register_next(folder: Path, base: str, settings: Settings) -> tuple[str, bool]:
    """Register the next expert; False when an earlier demo registered it (MLflow then sends no webhook, and
    on-new-expert merged it then: each expert is merged once)."""
    uri = expert_uri(base, folder.name, settings)
    before = mlflow_client(settings).search_model_versions(f"name='{expert_model_name(base, folder.name)}'")
    registered = register_expert(uri, folder.name, base, settings=settings)
    return uri, all(str(v.version) != registered.version for v in before)


def built_zoo(demo: DemoZoo, name: str) -> None:
    """Refuse, before anything starts, a real demo whose zoo was not built."""
    if demo.folder is not None and (not (demo.folder / "base").is_dir()
                                    or len(expert_folders(demo.folder)) <= demo.first_experts):
        raise ConfigError(f"demo --zoo {name}: no built zoo with {demo.first_experts + 1} experts in {demo.folder}; "
                          f"build it first with `{demo.built_by}`")


def run_pipeline_demo(workdir: Path, zoo_name: str = "tiny") -> None:
    started = time.perf_counter()
    demo = DEMOS[zoo_name]
    built_zoo(demo, zoo_name)
    settings = Settings.from_env()
    for service in stack.up(settings):
        print(f"         {service.name:<8} {service.note:<16} {redact_url(service.address)}")
    _step("local stack up", started)
    # The steps print one line each; task-level logs stay in the Prefect UI.
    for name in ("mergeplan", "prefect"):
        logging.getLogger(name).setLevel(logging.WARNING)
    zoo = demo.folder or workdir / "zoo"
    if demo.folder is None:
        build_zoo(zoo_name, zoo)
    _step(f"{zoo_name} zoo in {zoo}", started)
    experts = _store(zoo, demo, settings, started)
    config = PipelineConfig.model_validate(demo.pipeline | {
        "base": {"name": demo.base}, "data": data_uri(settings),
        "experts": [expert_uri(demo.base, folder.name, settings) for folder in experts[:demo.first_experts]]})
    workdir.mkdir(parents=True, exist_ok=True)
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
            wait_until(lambda: _served_since(f"on-new-expert/{demo.base}", serve_started) or server.poll() is not None,
                       120, "mergeplan serve")
            if server.poll() is not None:
                raise StackError(f"demo: mergeplan serve exited; see {log}")
            _step(f"serving on-new-expert (event trigger) and scaling-sweep (nightly); log in {log}", started)
            since_ms = int(time.time() * 1000)
            uri, new = _register_next(experts[demo.first_experts], demo.base, settings)
            how = ("registered -> MLflow webhook -> Prefect event mergeplan.expert.registered" if new else
                   "was registered and merged by an earlier demo (each expert is merged once): its run")
            _step(f"expert {experts[demo.first_experts].name} {how}", started)
            run = wait_until(lambda: _triggered_run(settings, config.experiment_name, uri, since_ms if new else 0),
                             demo.trigger_timeout_s, f"the on-new-expert run (see {log})")
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
          f"{config.experiment_name}; models merged.{demo.base} and expert.{demo.base}.*)")
    print(f"Prefect UI  {redact_url(settings.prefect_api_url).removesuffix('/api')}  (flow runs, deployments)")
    print("stop the stack with `mergeplan down`; the stack-less demo is `mergeplan demo --local`")
    _step("demo finished", started)
