"""Benchmark: the scaling sweep on a Dask cluster of separate processes against one process (CPU, loopback).

A local stack (SeaweedFS S3, MLflow, Prefect server) on free loopback ports; the zoo's base, its experts and its
evaluation data stored in S3. The scaling-sweep flow runs, each time with empty task-result storage (nothing
cached):

1. `threads`: the thread runner, in this process (one subset at a time: the loaded model is swapped in place);
2. `cluster, cold`: a `dask scheduler` and two `dask worker`s (tests/pipeline/dask_support.py: subprocesses, each
   with its own state folder), every worker fetching the base, the experts and the data from S3 and loading them;
3. `cluster, warm`: the same workers again, the family still loaded: the orchestration alone.

From each run: the sweep's wall time (MLflow metric stage.sweep.seconds), the compute inside the tasks (merge and
evaluation, and fetch + load of the family) and the overhead per task = (processes x sweep wall - compute) /
subsets: the time a worker process spends on a subset beyond measuring it (Prefect's task engine, result
persistence, Dask's dispatch, idling). The fetch per checkpoint is timed apart, downloading each folder from S3
into an empty cache. Then a paper estimate, from those per-task costs, of a 9-expert sweep of a 7B base on 8 GPU
workers against one (the per-subset compute and the S3 bandwidth at that size are assumptions, stated).

This is a benchmark, not a test: nothing is asserted. Results go to WORKDIR/cluster.md and cluster.json.

    .venv/bin/python bench/cluster.py --zoo ZOO                 # a built zoo (mergeplan zoo build --preset tiny)
    .venv/bin/python bench/cluster.py --experts 3 --eval-examples 4   # builds the tiny zoo first when --zoo is unset
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "pipeline"))  # the cluster of separate processes the tests start

BASE = "bench-base"
GB = 1e9


def bench_settings(state_dir: Path):
    from infra.settings import Settings
    from infra.stack import free_port_block

    return Settings(state_dir=state_dir, s3_port=free_port_block(10), mlflow_port=free_port_block(1),
                    prefect_port=free_port_block(1), webhook_port=free_port_block(1))


def stored_measurements(state: Path) -> list[dict]:
    """The sweep-merge results a run persisted under STATE/results (the SweepMerge fields)."""
    found = []
    for path in (state / "results").glob("sweep-merge-*"):
        found.append(json.loads(json.loads(path.read_text())["result"])["data"])
    return found


def sweep_run(name: str, config, settings, state: Path, processes: int) -> dict:
    """One scaling-sweep run with its task results under STATE (empty: nothing cached), and its costs."""
    from mlflow import MlflowClient

    from flows.runtime import configured
    from flows.scaling_sweep import scaling_sweep

    started = time.perf_counter()
    outcome = configured(scaling_sweep, config.runner, settings.model_copy(update={"state_dir": state}))(config)
    wall = time.perf_counter() - started
    metrics = MlflowClient(settings.mlflow_tracking_uri).get_run(outcome.run_id).data.metrics
    merges = stored_measurements(state)
    compute = sum(m["cost"]["seconds"] for m in merges)
    loads = [m["load_seconds"] for m in merges if m["load_seconds"] > 0]
    sweep_wall = metrics["stage.sweep.seconds"]
    return {"run": name, "subsets": len(merges), "processes": processes, "flow_s": wall, "sweep_s": sweep_wall,
            "compute_s": compute, "loads": len(loads), "load_s": sum(loads),
            "workers": len({m["worker"] for m in merges}),
            "overhead_per_task_s": (processes * sweep_wall - compute - sum(loads)) / len(merges),
            "compute_per_task_s": compute / len(merges)}


def fetch_costs(refs: list[str], settings, scratch: Path) -> dict:
    """Each stored folder downloaded into an empty cache: seconds and bytes per checkpoint."""
    from infra.s3 import download_folder

    seconds, sizes = [], []
    for uri in refs:
        started = time.perf_counter()
        folder = download_folder(uri, scratch / "cache", settings=settings)
        seconds.append(time.perf_counter() - started)
        sizes.append(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()))
    return {"checkpoints": len(refs), "per_checkpoint_s": sum(seconds) / len(refs),
            "per_checkpoint_mb": sum(sizes) / len(refs) / 1e6, "mb_per_s": sum(sizes) / 1e6 / sum(seconds)}


def estimate_7b(runs: dict[str, dict], methods: list[str], subset_seconds: list[float], fetch_gb_per_s: float,
                load_s: float, gpus: int) -> list[dict]:
    """A 9-expert balanced sweep of a 7B base (bf16 checkpoints, 14 GB each) on GPUS workers against one: each worker
    fetches the base and 9 experts once (10 x 14 GB at FETCH_GB_PER_S) and loads them (LOAD_S); every subset costs
    its compute (an assumption, each of SUBSET_SECONDS) plus the overhead per task measured here."""
    from merging.sweep.run import SweepSettings, planned_merges

    subsets = len(planned_merges(9, SweepSettings(methods=tuple(methods), design="balanced")))
    start = 10 * 14 * GB / (fetch_gb_per_s * GB) + load_s
    one, many = runs["threads"]["overhead_per_task_s"], runs["cluster, warm"]["overhead_per_task_s"]
    rows = []
    for compute in subset_seconds:
        single = start + subsets * (compute + one)
        spread = start + math.ceil(subsets / gpus) * (compute + many)
        rows.append({"subset_s": compute, "subsets": subsets, "one_gpu_h": single / 3600,
                     f"{gpus}_gpus_h": spread / 3600, "speed_up": single / spread})
    return rows


def markdown(runs: dict[str, dict], fetch: dict, estimate: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# The scaling sweep on a Dask cluster ({time.strftime('%Y-%m-%d')})", "",
             f"Zoo {args.zoo}, {args.experts} experts, methods {args.methods}, design balanced, "
             f"{args.eval_examples} eval examples per domain; 2 CPU cores shared with other benchmarks (loaded).", "",
             "| run | subsets | processes | sweep wall s | compute s | fetch+load s (count) | compute per task s | "
             "overhead per task s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['subsets']} | {r['processes']} | {r['sweep_s']:.1f} | {r['compute_s']:.1f} | "
              f"{r['load_s']:.1f} ({r['loads']}) | {r['compute_per_task_s']:.3f} | {r['overhead_per_task_s']:.3f} |"
              for r in runs.values()]
    lines += ["", f"Fetch from S3 into an empty cache: {fetch['per_checkpoint_s']:.2f} s per checkpoint "
              f"({fetch['checkpoints']} folders, {fetch['per_checkpoint_mb']:.1f} MB each, "
              f"{fetch['mb_per_s']:.2f} MB/s).", "",
              f"Paper estimate, 9 experts of a 7B base, {args.gpus} GPU workers against one "
              f"(fetch {args.fetch_gb_per_s:g} GB/s, load {args.load_7b_s:g} s per worker):", "",
              f"| compute per subset s | subsets | 1 GPU h | {args.gpus} GPUs h | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {row['subset_s']:g} | {row['subsets']} | {row['one_gpu_h']:.2f} | {row[f'{args.gpus}_gpus_h']:.2f} | "
              f"{row['speed_up']:.2f} |" for row in estimate]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, help="a built zoo (default: build the tiny preset in WORKDIR)")
    parser.add_argument("--experts", type=int, default=5, help="the first N experts of the zoo")
    parser.add_argument("--methods", default="average,task_arithmetic")
    parser.add_argument("--eval-examples", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--subset-seconds-7b", default="10,30,100",
                        help="assumed merge + evaluation seconds of one subset of a 7B base on one GPU")
    parser.add_argument("--fetch-gb-per-s", type=float, default=1.0, help="assumed S3 bandwidth per worker")
    parser.add_argument("--load-7b-s", type=float, default=120.0, help="assumed seconds to load 10 7B checkpoints")
    args = parser.parse_args()

    from dask_support import LoopbackCluster
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline_config import PipelineConfig
    from flows.runtime import prefect_api
    from infra import stack
    from infra.s3 import base_uri, data_uri, expert_uri, upload_data, upload_expert
    from merging.zoo.build import build_zoo
    from merging.zoo.layout import expert_folders

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mergeplan-bench-cluster-"))
    if args.zoo is None:
        args.zoo = workdir / "zoo"
        build_zoo("tiny", args.zoo)
    settings = bench_settings(workdir / "state")
    os.environ.update(settings.as_env())
    stack.up(settings, ["s3", "mlflow", "prefect"])
    runs: dict[str, dict] = {}
    try:
        folders = expert_folders(args.zoo)[:args.experts]
        upload_expert(args.zoo / "base", base_uri(BASE, settings), settings=settings)
        experts = [expert_uri(BASE, folder.name, settings) for folder in folders]
        for folder, uri in zip(folders, experts, strict=True):
            upload_expert(folder, uri, settings=settings)
        upload_data(args.zoo / "data", data_uri(settings), settings=settings)
        fetch = fetch_costs([base_uri(BASE, settings), *experts, data_uri(settings)], settings, workdir / "fetch")

        def config(runner: dict) -> PipelineConfig:
            return PipelineConfig.model_validate({
                "base": {"name": BASE}, "experts": experts, "method": "task_arithmetic", "data": data_uri(settings),
                "runner": runner, "sweep": {"methods": args.methods.split(","), "design": "balanced",
                                            "eval_examples": args.eval_examples}})

        with prefect_api(settings):
            runs["threads"] = sweep_run("threads", config({"kind": "threads"}), settings, workdir / "threads", 1)
            cluster = LoopbackCluster(workdir / "cluster", settings)
            try:
                cluster.start_scheduler()
                cluster.start_worker("a")
                cluster.start_worker("b")
                cluster.wait_for_workers(2)
                dask = config({"kind": "dask", "address": cluster.address})
                runs["cluster, cold"] = sweep_run("cluster, cold", dask, settings, workdir / "cold", 2)
                runs["cluster, warm"] = sweep_run("cluster, warm", dask, settings, workdir / "warm", 2)
            finally:
                cluster.close()
        APILogHandler().flush()
    finally:
        stack.down(settings, ["s3", "mlflow", "prefect"])
    estimate = estimate_7b(runs, args.methods.split(","), [float(s) for s in args.subset_seconds_7b.split(",")],
                           args.fetch_gb_per_s, args.load_7b_s, args.gpus)
    report = markdown(runs, fetch, estimate, args)
    (workdir / "cluster.md").write_text(report)
    (workdir / "cluster.json").write_text(json.dumps({"runs": runs, "fetch": fetch, "estimate_7b": estimate},
                                                     indent=2))
    print(report)
    print(f"written to {workdir}/cluster.md")


if __name__ == "__main__":
    main()
