"""Benchmark of the orchestrated pipeline (CPU): what Prefect, MLflow and S3 add, and what an incremental run saves.

1. Orchestration overhead. A local stack (moto S3, MLflow, Prefect server) on free loopback ports; the tiny zoo's
   base and K experts stored and registered. merge-pipeline runs once with empty caches (wall time measured around
   the call); then the same stages run as plain library calls in one process: download base + experts, merge,
   evaluate, upload, fit. Overhead = flow wall time - library wall time (Prefect task runs, result persistence,
   MLflow logging and registration). Then expert K+1 is registered and on-new-expert adds it to that merge (the
   head; incremental), against merge-pipeline with all K+1 (downloads cached, no other cache): whole runs. Last, the
   scaling-sweep flow over the K+1 experts on the thread runner and on a 2-worker Dask LocalCluster.
2. Incremental vs full. Random Llama checkpoints (merging.io.synthetic), K experts merged with their state kept; then
   expert K+1 is added by the flows' incremental path (copy the state, add_experts) and, separately, all K+1 are
   merged at once. Both are the merge tasks' own functions, without Prefect. Target: incremental <= 1.5/(K+1) of
   full for task_arithmetic and ties.

This is a benchmark, not a test: nothing is asserted. Results go to WORKDIR/pipeline.md.

    .venv/bin/python bench/pipeline.py                      # K = 8, hidden 1024 x 8 layers, 5 repeats
    .venv/bin/python bench/pipeline.py --experts 4 --hidden 128 --layers 2 --repeats 1   # a quick run
    .venv/bin/python bench/pipeline.py --cold --skip-overhead   # reads from disk, as for models beyond the memory
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = {"task_arithmetic": {"lambda": 0.3}, "ties": {"density": 0.3, "lambda": 0.5}}
SWEEP_RUNNERS = {"threads": {"kind": "threads"}, "dask": {"kind": "dask", "n_workers": 2}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bench_settings(state_dir: Path):
    from infra.settings import Settings

    return Settings(state_dir=state_dir, s3_port=free_port(), mlflow_port=free_port(), prefect_port=free_port(),
                    webhook_port=free_port())


def pipeline_runs(zoo: Path, experts: int, repeats: int, workdir: Path) -> dict[str, float]:
    """On a local stack: the orchestration overhead of merge-pipeline (flow wall time vs the same stages as library
    calls, both with empty caches), then an on-new-expert run adding expert K+1 to that merge (the head) against a
    merge-pipeline run of all K+1 (both with the experts' downloads cached, nothing else)."""
    from prefect.logging.handlers import APILogHandler

    from flows.merge_pipeline import merge_pipeline
    from flows.on_new_expert import on_new_expert
    from flows.pipeline_config import PipelineConfig
    from flows.runtime import configured, prefect_api
    from flows.scaling_sweep import scaling_sweep
    from infra import stack
    from infra.registry import register_expert
    from infra.s3 import base_uri, download_folder, expert_uri, upload_expert
    from merging import MergeConfig, merge
    from merging.evaluate import evaluate
    from merging.scaling_law.decision import DecisionRule
    from merging.zoo.layout import expert_folders
    from tasks.decide import LawJob, decide_job

    settings = bench_settings(workdir / "state")
    os.environ.update(settings.as_env())
    stack.up(settings, ["s3", "mlflow", "prefect"])
    try:
        upload_expert(zoo / "base", base_uri("bench-base", settings), settings=settings)
        folders = expert_folders(zoo)[:experts + 1]
        uris = [expert_uri("bench-base", folder.name, settings) for folder in folders]
        for folder, uri in zip(folders, uris, strict=True):
            upload_expert(folder, uri, settings=settings)
        for folder, uri in zip(folders[:experts], uris[:experts], strict=True):
            register_expert(uri, folder.name, "bench-base", settings=settings)
        fields = {"base": {"name": "bench-base"}, "method": "ties", "params": METHODS["ties"], "data": zoo / "data",
                  "eval": {"max_examples": 16, "batch_size": 16}}
        config = PipelineConfig.model_validate(fields | {"experts": uris[:experts]})

        def fresh_state(downloads_too: bool) -> None:
            for folder in ("results", "work", *(["cache"] if downloads_too else [])):
                shutil.rmtree(settings.state_dir / folder, ignore_errors=True)

        def timed(call, *args) -> tuple[float, object]:
            started = time.perf_counter()
            result = call(*args)
            return time.perf_counter() - started, result

        def library_stages() -> None:
            base = download_folder(base_uri("bench-base", settings), settings=settings)
            local = [download_folder(uri, settings=settings) for uri in uris[:experts]]
            out = merge(MergeConfig(base=base, experts=local, method="ties", params=METHODS["ties"]),
                        workdir / "library-merge", overwrite=True, save_state=workdir / "library-state")
            scores = evaluate(out, zoo / "data", max_examples=16, batch_size=16)
            upload_expert(out, f"s3://{settings.bucket}/merged/bench-base/library", settings=settings)
            decide_job(LawJob(method="ties", points=[(experts, scores.macro_ce)], experts=experts,
                              loss=scores.macro_ce, rule=DecisionRule()))

        flows, library = [], []
        with prefect_api(settings):
            configured(merge_pipeline, config.runner, settings)(config)  # warm-up: Prefect's first-flow start
            for _ in range(repeats):  # the flow and the library calls in turn, each from empty caches
                fresh_state(downloads_too=True)
                seconds, outcome = timed(lambda: configured(merge_pipeline, config.runner, settings)(config))
                flows.append(seconds)
                fresh_state(downloads_too=True)
                library.append(timed(library_stages)[0])
            new = register_expert(uris[experts], folders[experts].name, "bench-base", settings=settings)
            everything = PipelineConfig.model_validate(fields | {"experts": uris})
            runs: dict[str, list[float]] = {"incremental_run": [], "full_run": [], "incremental_merge": [],
                                            "full_merge": []}
            for _ in range(repeats):
                fresh_state(downloads_too=False)
                configured(merge_pipeline, config.runner, settings)(config)  # the head: the K-expert merge
                seconds, added = timed(configured(on_new_expert, config.runner, settings), config, new.s3_uri,
                                       new.sha256, new.version, new.domain, "bench-base")
                assert added.incremental, "on-new-expert did not take the incremental path"
                runs["incremental_run"].append(seconds)
                runs["incremental_merge"].append(added.stages["merge"].seconds)
                fresh_state(downloads_too=False)
                seconds, whole = timed(configured(merge_pipeline, config.runner, settings), everything)
                runs["full_run"].append(seconds)
                runs["full_merge"].append(whole.stages["merge"].seconds)
            sweep = {"methods": ["ties"], "params": {"ties": METHODS["ties"]}, "design": "balanced",
                     "eval_examples": 16}
            sweep_s = {}
            for name, runner in SWEEP_RUNNERS.items():
                fresh_state(downloads_too=False)
                swept = PipelineConfig.model_validate(fields | {"experts": uris, "sweep": sweep, "runner": runner})
                sweep_s[name] = timed(configured(scaling_sweep, swept.runner, settings), swept)[0]
    finally:
        APILogHandler().flush()  # the flows' last log lines, while Prefect still answers
        stack.down(settings, ["s3", "mlflow", "prefect"])
    flow_s, library_s = statistics.median(flows), statistics.median(library)
    return {"flow_s": flow_s, "library_s": library_s, "overhead_s": flow_s - library_s,
            "task_compute_s": sum(cost.seconds for cost in outcome.stages.values()),
            **{f"{name}_s": statistics.median(seconds) for name, seconds in runs.items()},
            **{f"sweep_{name}_s": seconds for name, seconds in sweep_s.items()}}


def settle(cold: bool) -> None:
    """Before a timed merge: earlier writes on disk; with COLD, the page cache emptied too (root only), so that
    every read comes from the disk, as it does for models larger than the memory."""
    os.sync()
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def incremental_ratio(method: str, experts: int, hidden: int, layers: int, repeats: int, workdir: Path,
                      cold: bool) -> dict[str, float]:
    """Median seconds of the incremental add of expert K+1 and of the full merge of K+1, and their ratio."""
    from merging.io.synthetic import llama_config, write_random_base, write_random_expert
    from tasks.fetch import CheckpointRef, LocalCheckpoint
    from tasks.merge import MergeJob, merge_full, merge_incremental

    models = workdir / f"models-{hidden}x{layers}"
    config = llama_config(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                          num_attention_heads=8, num_key_value_heads=4, vocab_size=8192, dtype="float32")
    if not (models / "base").is_dir():
        write_random_base(models / "base", config)
        for i in range(experts + 1):
            write_random_expert(models / "base", models / f"expert-{i:02d}", seed=i + 1)

    def local(path: Path) -> LocalCheckpoint:
        return LocalCheckpoint(ref=CheckpointRef(name=path.name, domain=path.name, uri=str(path),
                                                 sha256=path.name.ljust(64, "0")[:64]), path=path)

    base = local(models / "base")
    pool = [local(models / f"expert-{i:02d}") for i in range(experts + 1)]
    head = MergeJob(base=base, experts=pool[:experts], method=method, params=METHODS[method], seed=0)
    full_job = head.extended(pool[experts])
    incremental, full = [], []
    for _ in range(repeats):
        shutil.rmtree(workdir / "state" / "work", ignore_errors=True)
        previous = merge_full.fn(head)
        settle(cold)
        started = time.perf_counter()
        merge_incremental.fn(full_job, previous, pool[experts])
        incremental.append(time.perf_counter() - started)
        shutil.rmtree(full_job.folder)
        settle(cold)
        started = time.perf_counter()
        merge_full.fn(full_job)
        full.append(time.perf_counter() - started)
    inc, whole = statistics.median(incremental), statistics.median(full)
    return {"incremental_s": inc, "full_s": whole, "ratio": inc / whole, "target": 1.5 / (experts + 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8, help="K: experts before the new one")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pipeline-experts", type=int, default=6, help="experts of the tiny zoo in the flow")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "pipeline")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--cold", action="store_true",
                        help="empty the page cache before each timed merge (needs root): reads from disk")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ["MERGEPLAN_STATE_DIR"] = str(args.workdir / "state")
    lines = ["# Pipeline benchmark", ""]
    lines += [f"Incremental add of expert K+1 vs full merge of K+1 (K = {args.experts}, random Llama hidden "
              f"{args.hidden} x {args.layers} layers, float32, median of {args.repeats}, "
              f"{'page cache emptied' if args.cold else 'earlier writes synced'} before each)", "",
              "| method | incremental s | full s | ratio | target 1.5/(K+1) |", "| --- | --- | --- | --- | --- |"]
    for method in METHODS:
        figures = incremental_ratio(method, args.experts, args.hidden, args.layers, args.repeats, args.workdir,
                                    args.cold)
        lines.append(f"| {method} | {figures['incremental_s']:.2f} | {figures['full_s']:.2f} | "
                     f"{figures['ratio']:.3f} | {figures['target']:.3f} |")
        print(lines[-1], flush=True)
    if not args.skip_overhead:
        from merging.zoo.build import build_zoo

        zoo = args.workdir / "zoo"
        build_zoo("tiny", zoo)
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            figures = pipeline_runs(zoo, args.pipeline_experts, args.repeats, Path(tmp))
        k = args.pipeline_experts
        lines += ["", f"Orchestration overhead (tiny zoo, ties, K = {k}, empty caches, warm Prefect, median of "
                  f"{args.repeats})", "",
                  "| flow s | same stages as library calls s | overhead s | merge+evaluate inside tasks s |",
                  "| --- | --- | --- | --- |",
                  f"| {figures['flow_s']:.2f} | {figures['library_s']:.2f} | {figures['overhead_s']:.2f} | "
                  f"{figures['task_compute_s']:.2f} |", "",
                  f"Runs: on-new-expert adding expert {k + 1} to the head vs merge-pipeline with all {k + 1} "
                  f"(tiny zoo, ties, downloads cached, median of {args.repeats})", "",
                  "| run | incremental s | full s | ratio | target 1.5/(K+1) |", "| --- | --- | --- | --- | --- |",
                  f"| whole flow | {figures['incremental_run_s']:.2f} | {figures['full_run_s']:.2f} | "
                  f"{figures['incremental_run_s'] / figures['full_run_s']:.3f} | {1.5 / (k + 1):.3f} |",
                  f"| merge task | {figures['incremental_merge_s']:.3f} | {figures['full_merge_s']:.3f} | "
                  f"{figures['incremental_merge_s'] / figures['full_merge_s']:.3f} | {1.5 / (k + 1):.3f} |"]
        lines += ["", f"scaling-sweep flow, ties, balanced design over the {k + 1} experts (one task on threads, one "
                  "per Dask worker), caches emptied but downloads", "", "| runner | seconds |", "| --- | --- |"]
        lines += [f"| {name} | {figures[f'sweep_{name}_s']:.1f} |" for name in SWEEP_RUNNERS]
        print("\n".join(lines[-16:]), flush=True)
    (args.workdir / "pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
