"""Benchmark: mergeplan vs mergekit on identical random Llama checkpoints (CPU).

For each model size, expert count K and method, both command-line tools merge the same base + K experts as
child processes. We record each child's wall time and peak RSS, check that the two outputs agree tensor by
tensor, and print a markdown table (also written to WORKDIR/merge_speed.md).

This is a benchmark, not a test: nothing is asserted about the timings.

    .venv/bin/python bench/merge_speed.py                       # 1b (0.95B), K = 3 and 8, both methods
    .venv/bin/python bench/merge_speed.py --sizes 270m,170m     # the smaller models
    .venv/bin/python bench/merge_speed.py --sizes tiny --experts 2,3   # a quick end-to-end smoke run
    .venv/bin/python bench/merge_speed.py --adapter-base .mergeplan/zoo-r/base   # LoRA adapters vs dense

With --adapter-base, the peer is mergeplan itself: K LoRA adapters (rank 8 on every linear layer, random) on
that base merged as adapters, against the same experts merge_and_unload()-ed by peft into full checkpoints
and merged dense; both outputs must agree to float tolerance.

Measurement notes
- Peak RSS is the child's VmHWM from /proc, polled every 20 ms (Linux only). It counts resident pages of
  memory-mapped files too: mergekit reads safetensors through mmap, mergeplan with pread into private
  buffers, so the table also has the sampled peak of anonymous memory (RssAnon).
- The inputs are read once before each case so that both tools start with a warm page cache, and the two
  tools alternate which one runs first from one repeat to the next.
- The floor of each case is this machine's (bench/merge_floor.py): a child process that only imports what a merge
  imports, plus the inputs' bytes read from the page cache and the output's bytes written into it, with as many
  threads as mergeplan has workers and no arithmetic (medians of 3).
- mergekit is LGPL; it is only run through its `mergekit-yaml` command, never imported.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from merge_floor import Floor, measure_floor
from merge_outputs import ATOL, KNOWN_DIFFERENCES, RTOL, Comparison, compare_outputs, describe  # bench/ is sys.path[0]

from merging.io.checkpoint import CheckpointReader
from merging.io.synthetic import llama_config, write_random_base, write_random_expert
from merging.streaming import WORKERS

REPO = Path(__file__).resolve().parent.parent
OURS_CLI = REPO / ".venv" / "bin" / "mergeplan"
MERGEKIT_CLI = REPO / ".venv-bench" / "bin" / "mergekit-yaml"
BASE_SEED = 0
EXPERT_SCALE = 0.1
SHARD_BYTES = 200_000_000  # 200 MB shards for inputs and both outputs
DENSITY = 0.5
LAMBDA = 1.0
POLL_SECONDS = 0.02
STARTUP = [str(OURS_CLI.parent / "python"), "-c", "import mergeplan.cli, merging.merger"]  # what a merge imports

SIZES: dict[str, dict] = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "270m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000),
    "170m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
}
METHODS = ("task_arithmetic", "ties")
# ---------------------------------------------------------------- inputs


def size_config(size: str) -> dict:
    return llama_config(**SIZES[size], tie_word_embeddings=False, dtype="bfloat16")


def parameter_count(folder: Path) -> int:
    reader = CheckpointReader(folder)
    return sum(int(torch.Size(info.shape).numel()) for info in reader.tensors.values())


def parameter_bytes(folder: Path, dtype: torch.dtype) -> int:
    return parameter_count(folder) * dtype.itemsize


def ensure_checkpoints(models_dir: Path, size: str, num_experts: int) -> tuple[Path, list[Path]]:
    """Base + experts 1..num_experts for `size`; folders already there (same config) are reused."""
    config = size_config(size)
    folder = models_dir / size
    base = folder / "base"
    experts = [folder / f"expert-{seed:02d}" for seed in range(1, num_experts + 1)]
    if base.exists() and CheckpointReader(base).config != config:
        sys.exit(f"{base} holds a checkpoint with another config; delete {folder} to rebuild it")
    if not base.exists():
        print(f"writing {base}", flush=True)
        write_random_base(base, config, seed=BASE_SEED, max_shard_size=SHARD_BYTES)
    for seed, expert in enumerate(experts, start=1):
        if not expert.exists():
            print(f"writing {expert}", flush=True)
            write_random_expert(base, expert, seed=seed, scale=EXPERT_SCALE, max_shard_size=SHARD_BYTES)
    return base, experts


def warm_page_cache(folders: list[Path]) -> None:
    """Read every input file once, so neither tool pays for a cold cache the other did not."""
    for folder in folders:
        for path in sorted(folder.iterdir()):
            with open(path, "rb", buffering=0) as f:
                while f.read(1 << 24):
                    pass


# ---------------------------------------------------------------- configs


def ours_yaml(base: Path, experts: list[Path], method: str) -> dict:
    params = {"lambda": LAMBDA} if method == "task_arithmetic" else {"density": DENSITY, "lambda": LAMBDA}
    return {"base": str(base), "experts": [str(e) for e in experts], "method": method, "params": params,
            "dtype": "bfloat16", "max_shard_size": SHARD_BYTES}


def mergekit_yaml(base: Path, experts: list[Path], method: str) -> dict:
    """The mergekit config with our semantics: weight 1 per expert, float32 compute, bf16 output.

    task_arithmetic: mergekit's default normalize=false is ours (θ0 + λ Σ τi).
    ties: mergekit's default normalize=true gives the disjoint mean; density is a per-model parameter.
    """
    model_params = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": DENSITY}
    normalize = method == "ties"
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": dict(model_params)} for e in experts],
        "parameters": {"lambda": LAMBDA, "normalize": normalize},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }


def ours_command(config: Path, out: Path) -> list[str]:
    return [str(OURS_CLI), "-q", "merge", str(config), str(out), "--overwrite"]


def mergekit_command(config: Path, out: Path) -> list[str]:
    return [str(MERGEKIT_CLI), str(config), str(out), "--no-cuda", "--no-copy-tokenizer",
            "--no-write-model-card", "--out-shard-size", str(SHARD_BYTES // 2), "--quiet"]


# ---------------------------------------------------------------- running


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    peak_anon_mb: float | None


def _memory_kib(pid: int) -> tuple[int, int] | None:
    """(VmHWM, RssAnon) of a live process: its peak resident set so far, and its anonymous memory now."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon"):
                    fields[key] = int(value.split()[0])
    except OSError:
        return None
    return (fields["VmHWM"], fields["RssAnon"]) if len(fields) == 2 else None


def _poll_memory(pid: int, done: threading.Event, peak: list[int]) -> None:
    while not done.is_set():
        sample = _memory_kib(pid)
        if sample is not None:
            peak[0], peak[1] = max(peak[0], sample[0]), max(peak[1], sample[1])
        done.wait(POLL_SECONDS)


def run_child(command: list[str], log: Path) -> Run:
    """Run a command; its wall time, peak RSS and sampled peak RssAnon.

    Peak RSS is the child's own VmHWM (reset by exec), polled: ru_maxrss from wait4 would also count the
    pages the child shared with this (large) benchmark process between fork and exec.
    """
    with open(log, "w") as log_file:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
        done, peak = threading.Event(), [0, 0]
        poller = threading.Thread(target=_poll_memory, args=(process.pid, done, peak), daemon=True)
        poller.start()
        process.wait()
        seconds = time.perf_counter() - start
        done.set()
        poller.join()
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"{command[0]} exited with {process.returncode}; log {log}:\n{tail}")
    return Run(seconds, peak[0] / 1024, peak[1] / 1024 if peak[1] else None)


# ---------------------------------------------------------------- one case


@dataclass
class CaseResult:
    size: str
    params: int
    num_experts: int
    method: str
    ours: list[Run]
    mergekit: list[Run]
    comparison: Comparison
    floor: Floor | None = None


def median_of(runs: list[Run], attribute: str) -> float | None:
    values = [getattr(r, attribute) for r in runs if getattr(r, attribute) is not None]
    return statistics.median(values) if values else None


def run_case(case_dir: Path, base: Path, experts: list[Path], method: str, repeats: int,
             keep_outputs: bool) -> tuple[list[Run], list[Run], Comparison]:
    case_dir.mkdir(parents=True, exist_ok=True)
    ours_cfg, mk_cfg = case_dir / "mergeplan.yaml", case_dir / "mergekit.yaml"
    ours_cfg.write_text(yaml.safe_dump(ours_yaml(base, experts, method), sort_keys=False))
    mk_cfg.write_text(yaml.safe_dump(mergekit_yaml(base, experts, method), sort_keys=False))
    ours_out, mk_out = case_dir / "out-mergeplan", case_dir / "out-mergekit"
    tools = {
        "mergeplan": (ours_command(ours_cfg, ours_out), ours_out),
        "mergekit": (mergekit_command(mk_cfg, mk_out), mk_out),
    }
    runs: dict[str, list[Run]] = {"mergeplan": [], "mergekit": []}
    warm_page_cache([base, *experts])
    for repeat in range(repeats):
        order = ["mergeplan", "mergekit"] if repeat % 2 == 0 else ["mergekit", "mergeplan"]
        for tool in order:
            command, out = tools[tool]
            shutil.rmtree(out, ignore_errors=True)  # same starting point for both (not timed)
            run = run_child(command, case_dir / f"{tool}-{repeat}.log")
            runs[tool].append(run)
            print(f"    {tool:9s} repeat {repeat}: {run.seconds:7.2f} s, peak RSS {run.peak_rss_mb:7.0f} MB",
                  flush=True)
    comparison = compare_outputs(ours_out, mk_out, (base, experts) if method == "ties" else None, DENSITY)
    print(f"    equality: {describe(comparison)}", flush=True)
    if not keep_outputs:
        shutil.rmtree(ours_out, ignore_errors=True)
        shutil.rmtree(mk_out, ignore_errors=True)
    return runs["mergeplan"], runs["mergekit"], comparison


# ---------------------------------------------------------------- report


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def markdown_table(results: list[CaseResult], repeats: int) -> str:
    header = ("| size | params | K | method | ours s | mergekit s | time ratio | floor s | ours / floor | "
              "ours peak RSS MB | mergekit peak RSS MB | RSS ratio | ours peak anon MB | mergekit peak anon MB | "
              "equal (max diff) |")
    lines = [f"Medians over {repeats} repeat(s); ratios are ours / mergekit. CPU, bf16 in and out, "
             f"float32 compute. Tolerance: |diff| <= {ATOL:g} + {RTOL:g}·|mergekit|.", "",
             header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        ours_s, mk_s = median_of(r.ours, "seconds"), median_of(r.mergekit, "seconds")
        ours_rss, mk_rss = median_of(r.ours, "peak_rss_mb"), median_of(r.mergekit, "peak_rss_mb")
        ours_anon, mk_anon = median_of(r.ours, "peak_anon_mb"), median_of(r.mergekit, "peak_anon_mb")
        c = r.comparison
        equal = f"{'PASS' if c.passed else 'FAIL'} ({c.max_abs_diff:.2g})"
        if c.mismatched:
            equal += f", {c.mismatched / max(c.total, 1):.1e} beyond tol"
        if c.undefined:
            equal += f"; {c.undefined_mismatched / c.total:.1%} differ where undefined"
        floor = r.floor.seconds if r.floor else None
        lines.append(f"| {r.size} | {r.params / 1e6:.0f}M | {r.num_experts} | {r.method} | {_fmt(ours_s, 2)} | "
                     f"{_fmt(mk_s, 2)} | {_ratio(ours_s, mk_s)} | {_fmt(floor, 2)} | {_ratio(ours_s, floor)} | "
                     f"{_fmt(ours_rss, 0)} | {_fmt(mk_rss, 0)} | "
                     f"{_ratio(ours_rss, mk_rss)} | {_fmt(ours_anon, 0)} | {_fmt(mk_anon, 0)} | {equal} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=_csv, default=_csv("1b"),
                        help=f"comma-separated, from {', '.join(SIZES)} (default 1b)")
    parser.add_argument("--experts", type=lambda s: [int(k) for k in _csv(s)], default=[3, 8],
                        help="comma-separated expert counts K (default 3,8)")
    parser.add_argument("--methods", type=_csv, default=list(METHODS),
                        help=f"comma-separated, from {', '.join(METHODS)} (default both)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and case; medians are reported")
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out",
                        help="checkpoints, configs, logs and the report (default bench/out)")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the merged checkpoints")
    parser.add_argument("--adapter-base", type=Path, metavar="FOLDER",
                        help="instead of mergekit: LoRA adapters on this base vs their dense copies (e.g. the real "
                             "zoo's base)")
    args = parser.parse_args(argv)
    for size in args.sizes:
        if size not in SIZES:
            parser.error(f"--sizes: unknown size {size!r}; choose from {', '.join(SIZES)}")
    for method in args.methods:
        if method not in METHODS:
            parser.error(f"--methods: unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not args.experts or min(args.experts) < 1 or args.repeats < 1:
        parser.error("--experts and --repeats must be positive")
    for cli in (OURS_CLI,) if args.adapter_base else (OURS_CLI, MERGEKIT_CLI):
        if not cli.exists():
            parser.error(f"{cli} is missing; install the venvs first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.adapter_base:
        from merge_speed_adapters import adapters_main

        return adapters_main(args)
    workdir: Path = args.workdir.resolve()
    results: list[CaseResult] = []
    floors: list[str] = []
    for size in args.sizes:
        base, experts = ensure_checkpoints(workdir / "models", size, max(args.experts))
        params = parameter_count(base)
        print(f"{size}: {params / 1e6:.1f}M parameters", flush=True)
        for num_experts in args.experts:
            warm_page_cache([base, *experts[:num_experts]])
            floor = measure_floor([base, *experts[:num_experts]], parameter_bytes(base, torch.bfloat16),
                                  workdir / "floor.bin", lambda: run_child(STARTUP, workdir / "startup.log").seconds,
                                  threads=WORKERS)
            floors.append(f"- {size}, K = {num_experts}: {floor.describe()}")
            print(f"  {size} K={num_experts}: {floor.describe()}", flush=True)
            for method in args.methods:
                print(f"  {size} K={num_experts} {method}", flush=True)
                case_dir = workdir / "runs" / size / f"k{num_experts}" / method
                ours, mergekit, comparison = run_case(case_dir, base, experts[:num_experts], method,
                                                      args.repeats, args.keep_outputs)
                results.append(CaseResult(size, params, num_experts, method, ours, mergekit, comparison, floor))
    table = markdown_table(results, args.repeats) + "\nFloors (bench/merge_floor.py):\n" + "\n".join(floors) + "\n"
    print()
    print(table)
    report = workdir / "merge_speed.md"
    notes = KNOWN_DIFFERENCES if "ties" in args.methods else ""
    if notes:
        print(notes)
    report.write_text("# mergeplan vs mergekit: merge speed and memory\n\n" + table + "\n" + notes)
    print(f"written to {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
