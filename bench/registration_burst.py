"""Benchmark: a burst of expert registrations through the whole local stack, and how `.mergeplan/` grows.

A stack of its own (SeaweedFS S3, MLflow, Prefect, the webhook receiver) in a temporary state folder, on free
loopback ports. The tiny zoo's base and data are stored; a first expert is merged by merge-pipeline (the first
champion); `mergeplan serve` is started; then --experts experts (copies of the zoo's nine with a little seeded
noise, each under a name of its own) are uploaded and registered one right after another. Each registration goes
MLflow -> webhook -> Prefect event -> the on-new-expert deployment (one run at a time). The bench waits for all
of them and checks: every version was merged by exactly one finished run, the runs ran in registration order,
no run failed, and the final head holds every expert and equals a batch merge of them (max |difference|), and
whether it is also the champion.
It prints the time to drain the burst, and the state folder's size after each run, by part.

    .venv/bin/python bench/registration_burst.py --experts 30 --zoo ZOO   # ZOO: a built `tiny` zoo (or built here)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from unittest import mock

import yaml
from mlflow import MlflowClient
from pydantic import SecretStr

from flows.merge_pipeline import merge_pipeline
from flows.pipeline_config import PipelineConfig
from flows.runtime import configured, prefect_api
from infra import stack
from infra.registry import champion_version, head_version, register_expert
from infra.s3 import download_folder, expert_uri, upload_expert
from infra.settings import S3_INTERNAL_PORTS, Settings
from infra.stack import free_port_block
from merging import ExpertRef, MergeConfig, merge
from merging.io.checkpoint import CheckpointReader
from merging.io.synthetic import write_random_expert
from merging.zoo.build import build_zoo
from tasks.fetch import merged_experts
from tasks.tracking import FLOW_TAG, NEW_EXPERT_TAG

BASE = "burst-base"
REPO = Path(__file__).parents[1]


def folder_megabytes(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6 if path.exists() else 0.0


def sizes(state: Path) -> dict[str, float]:
    """Megabytes of the state folder, by its parts."""
    parts = {"work": state / "work", "cache": state / "cache", "results": state / "results", "s3": state / "s3"}
    report = {name: folder_megabytes(path) for name, path in parts.items()}
    report["databases"] = sum(p.stat().st_size for p in state.glob("*.db*")) / 1e6
    report["total"] = folder_megabytes(state)
    return report


def burst_settings(state: Path) -> Settings:
    ports = {"s3_port": free_port_block(S3_INTERNAL_PORTS + 1), "mlflow_port": free_port_block(1),
             "prefect_port": free_port_block(1), "webhook_port": free_port_block(1)}
    return Settings(state_dir=state, s3_server="seaweedfs", webhook_secret=SecretStr("burst-secret"),
                    startup_timeout_s=180, **ports)


def finished_runs(client: MlflowClient, experiment_id: str) -> list:
    runs = client.search_runs([experiment_id], f"tags.`{FLOW_TAG}` = 'on-new-expert'", max_results=1000)
    return sorted(runs, key=lambda run: run.info.start_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=30)
    parser.add_argument("--zoo", type=Path, help="a built tiny zoo (default: build one in the temporary folder)")
    parser.add_argument("--timeout-s", type=float, default=3600)
    args = parser.parse_args()

    with TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        zoo = args.zoo.resolve() if args.zoo else None  # the served flows run in folders of their own
        if zoo is None:
            zoo = tmp / "zoo"
            build_zoo("tiny", zoo)
        settings = burst_settings(tmp / "state")
        # A small λ: every copy adds a little of its domain, so the loss mostly keeps falling.
        config = PipelineConfig.model_validate({
            "base": {"name": BASE}, "method": "task_arithmetic", "params": {"lambda": 0.05}, "data": zoo / "data",
            "eval": {"max_examples": 4, "batch_size": 8}, "law": {"min_gain": 0.001}})
        config_file = tmp / "pipeline.yaml"
        config_file.write_text(yaml.safe_dump(config.as_parameters()))
        domains = sorted(p.name for p in (zoo / "experts").iterdir())
        stack.up(settings)
        serve = None
        try:
            with mock.patch.dict(os.environ, settings.as_env()):
                upload_expert(zoo / "base", f"s3://{settings.bucket}/bases/{BASE}", settings=settings)
                first = expert_uri(BASE, "first", settings)
                upload_expert(zoo / "experts" / domains[0], first, settings=settings)
                register_expert(first, "first", BASE, settings=settings)
                with prefect_api(settings):
                    configured(merge_pipeline, config.runner, settings)(config)
                names = [f"{domains[i % len(domains)]}-{i}" for i in range(args.experts)]
                for i, name in enumerate(names):  # uploads first: the burst is of registrations
                    copy = write_random_expert(zoo / "experts" / domains[i % len(domains)], tmp / "copies" / name,
                                               seed=i, scale=0.01)
                    upload_expert(copy, expert_uri(BASE, name, settings), settings=settings)
                before = sizes(settings.state_dir)
                env = {**settings.as_env(), "PATH": os.environ["PATH"], "PREFECT_HOME": str(tmp / "prefect-client")}
                serve_log = (tmp / "serve.log").open("w")  # noqa: SIM115 - open while the server runs
                serve = subprocess.Popen([sys.executable, "-m", "mergeplan.cli", "serve", str(config_file)], env=env,
                                         cwd=REPO, stdout=serve_log, stderr=subprocess.STDOUT)
                time.sleep(20)  # the deployments register with the server before the first event
                started = time.perf_counter()
                registered = [register_expert(expert_uri(BASE, name, settings), name, BASE, settings=settings)
                              for name in names]
                registering_s = time.perf_counter() - started
                client = MlflowClient(settings.mlflow_tracking_uri)
                experiment = client.get_experiment_by_name(config.experiment_name).experiment_id
                growth, seen = [], 0
                deadline = time.monotonic() + args.timeout_s
                while seen < len(names) and time.monotonic() < deadline:
                    runs = [r for r in finished_runs(client, experiment) if r.info.status != "RUNNING"]
                    if len(runs) > seen:
                        seen = len(runs)
                        growth.append((seen, time.perf_counter() - started, sizes(settings.state_dir)))
                        print(f"{seen} runs done at {growth[-1][1]:.0f} s; state {growth[-1][2]['total']:.1f} MB",
                              flush=True)
                    time.sleep(2)
                drained_s = time.perf_counter() - started
                runs = finished_runs(client, experiment)
                merged_uris = [r.data.tags.get(NEW_EXPERT_TAG) for r in runs]
                statuses = [r.info.status for r in runs]
                head, champion = head_version(BASE, settings=settings), champion_version(BASE, settings=settings)
                held = [ref.name for ref in merged_experts(head)]
                full = merge(MergeConfig(base=zoo / "base", method="task_arithmetic", params={"lambda": 0.05},
                                         experts=[ExpertRef(path=zoo / "experts" / domains[0], name="first")] + [
                                             ExpertRef(path=tmp / "copies" / n, name=n) for n in names]),
                             tmp / "batch")
                served = download_folder(head.source, tmp / "cache", settings=settings)
                a, b = CheckpointReader(served), CheckpointReader(full)
                max_diff = max(float((a.read(n).float() - b.read(n).float()).abs().max()) for n in b.names())
        finally:
            if serve is not None:
                serve.terminate()
                serve.wait(60)
                serve_log.close()
            stack.down(settings)

        expected = [r.s3_uri for r in registered]
        report = {
            "experts": len(names), "registering_s": round(registering_s, 2), "drained_s": round(drained_s, 1),
            "runs": len(runs), "runs_finished": statuses.count("FINISHED"), "runs_failed": statuses.count("FAILED"),
            "each_merged_once": sorted(merged_uris) == sorted(expected),
            "in_registration_order": merged_uris == expected,
            "head_holds_all_in_order": held == ["first", *names], "head_vs_batch_max_abs_diff": max_diff,
            "champion_is_head": champion.version == head.version, "champion_experts": len(merged_experts(champion)),
            "champion_macro_ce": float(champion.tags["macro_ce"]), "head_macro_ce": float(head.tags["macro_ce"]),
            "state_mb_before": round(before["total"], 1),
            "state_mb_after": {k: round(v, 1) for k, v in growth[-1][2].items()} if growth else None,
            "state_mb_per_run": round((growth[-1][2]["total"] - before["total"]) / len(growth), 2) if growth else None,
        }
        print(json.dumps(report, indent=1))
        if not growth or seen < len(names) or report["runs_failed"]:
            print(f"{seen} of {len(names)} runs ended within {args.timeout_s:.0f} s, {report['runs_failed']} failed; "
                  "the errors in the serve log:")
            print("\n".join(line for line in (tmp / "serve.log").read_text().splitlines()
                            if "Error" in line or "error" in line)[-5000:])


if __name__ == "__main__":
    main()
