"""bench/merge_speed.py --adapter-base FOLDER: K random LoRA adapters on that base merged as adapters by mergeplan,
against the same experts merge_and_unload()-ed by peft into full checkpoints and merged dense (mergeplan is its own
peer here); both outputs must agree to float tolerance."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml
from merge_outputs import Comparison, compare_outputs, describe
from merge_speed import (
    CaseResult,
    Run,
    _fmt,
    _ratio,
    median_of,
    ours_command,
    ours_yaml,
    parameter_count,
    run_child,
    warm_page_cache,
)

from merging.io.synthetic import write_random_lora

ADAPTER_RANK = 8


def ensure_adapters(models_dir: Path, base: Path, num_experts: int) -> tuple[list[Path], list[Path]]:
    """K random LoRA adapters on `base` and their merge_and_unload()-ed full checkpoints (peft's own merge)."""
    from peft import PeftModel

    from merging.io.hf_loading import load_causal_lm

    adapters, dense = [], []
    for seed in range(1, num_experts + 1):
        adapter, full = models_dir / f"adapter-{seed:02d}", models_dir / f"dense-{seed:02d}"
        if not adapter.exists():
            print(f"writing {adapter}", flush=True)
            write_random_lora(base, adapter, seed=seed, rank=ADAPTER_RANK, alpha=2 * ADAPTER_RANK, scale=1.0)
        if not full.exists():
            print(f"writing {full}", flush=True)
            model = PeftModel.from_pretrained(load_causal_lm(base), adapter).merge_and_unload()
            model.save_pretrained(full)
        adapters.append(adapter)
        dense.append(full)
    return adapters, dense


def run_adapter_case(case_dir: Path, base: Path, adapters: list[Path], dense: list[Path], method: str,
                     repeats: int) -> tuple[list[Run], list[Run], Comparison]:
    """mergeplan on the adapters vs mergeplan on their dense copies, alternating which goes first."""
    case_dir.mkdir(parents=True, exist_ok=True)
    tools = {}
    for tool, experts in (("adapters", adapters), ("dense", dense)):
        config = ours_yaml(base, experts, method) | {"dtype": None}
        path = case_dir / f"{tool}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        tools[tool] = (ours_command(path, case_dir / f"out-{tool}"), case_dir / f"out-{tool}")
    runs: dict[str, list[Run]] = {"adapters": [], "dense": []}
    for repeat in range(repeats):
        warm_page_cache([base, *adapters, *dense])
        for tool in (["adapters", "dense"] if repeat % 2 == 0 else ["dense", "adapters"]):
            command, out = tools[tool]
            shutil.rmtree(out, ignore_errors=True)
            run = run_child(command, case_dir / f"{tool}-{repeat}.log")
            runs[tool].append(run)
            print(f"    {tool:9s} repeat {repeat}: {run.seconds:7.2f} s, peak RSS {run.peak_rss_mb:7.0f} MB",
                  flush=True)
    comparison = compare_outputs(tools["adapters"][1], tools["dense"][1])
    print(f"    equality: {describe(comparison)}", flush=True)
    for _, out in tools.values():
        shutil.rmtree(out, ignore_errors=True)
    return runs["adapters"], runs["dense"], comparison


def adapter_table(results: list[CaseResult], repeats: int) -> str:
    header = ("| base | K | method | adapters s | dense s | time ratio | adapters peak RSS MB | dense peak RSS MB | "
              "RSS ratio | equal (max diff) |")
    lines = [f"Medians over {repeats} repeat(s); ratios are adapters / dense (the same experts merge_and_unload()-ed "
             f"by peft). LoRA rank {ADAPTER_RANK} on every linear layer; float32 in and out.", "",
             header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        ours_s, dense_s = median_of(r.ours, "seconds"), median_of(r.mergekit, "seconds")
        ours_rss, dense_rss = median_of(r.ours, "peak_rss_mb"), median_of(r.mergekit, "peak_rss_mb")
        c = r.comparison
        lines.append(f"| {r.size} ({r.params / 1e6:.0f}M) | {r.num_experts} | {r.method} | {_fmt(ours_s, 2)} | "
                     f"{_fmt(dense_s, 2)} | {_ratio(ours_s, dense_s)} | {_fmt(ours_rss, 0)} | {_fmt(dense_rss, 0)} | "
                     f"{_ratio(ours_rss, dense_rss)} | {'PASS' if c.passed else 'FAIL'} ({c.max_abs_diff:.2g}) |")
    return "\n".join(lines) + "\n"


def adapters_main(args: argparse.Namespace) -> int:
    workdir: Path = args.workdir.resolve()
    base = args.adapter_base.resolve()
    adapters, dense = ensure_adapters(workdir / "models" / "adapters", base, max(args.experts))
    params = parameter_count(base)
    results: list[CaseResult] = []
    for num_experts in args.experts:
        for method in args.methods:
            print(f"  {base.name} K={num_experts} {method}: adapters vs dense", flush=True)
            case_dir = workdir / "runs" / "adapters" / f"k{num_experts}" / method
            ours, peer, comparison = run_adapter_case(case_dir, base, adapters[:num_experts], dense[:num_experts],
                                                      method, args.repeats)
            results.append(CaseResult(base.name, params, num_experts, method, ours, peer, comparison))
    table = adapter_table(results, args.repeats)
    print()
    print(table)
    report = workdir / "merge_speed_adapters.md"
    report.write_text("# mergeplan: LoRA adapters vs their dense copies\n\n" + table)
    print(f"written to {report}")
    return 0
