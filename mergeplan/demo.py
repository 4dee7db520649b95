"""`mergeplan demo`: the tiny zoo merged with every method (calibrated ones included), evaluated, and the
incremental merge checked."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from merging import MergeConfig, add_experts, merge
from merging.evaluate import evaluate
from merging.io.checkpoint import CheckpointReader
from merging.methods.registry import is_calibrated
from merging.zoo.build import build_zoo
from merging.zoo.layout import expert_folders

METHODS = {
    "average": {},
    "task_arithmetic": {"lambda": 0.3},
    "ties": {"density": 0.3, "lambda": 0.5},
    "dare_linear": {"density": 0.5, "lambda": 0.3},
    "dare_ties": {"density": 0.5, "lambda": 0.5},
    "expert_merging": {"init": 0.11},  # ᾱ near 1/9: the average of nine experts
    "expert_merging_pp": {"init": 0.11},
}


def max_difference(a: Path, b: Path) -> float:
    first, second = CheckpointReader(a), CheckpointReader(b)
    return max(float((first.read(n).float() - second.read(n).float()).abs().max()) for n in first.names())


def run_demo(workdir: Path) -> None:
    log = logging.getLogger("mergeplan")
    started = time.perf_counter()
    zoo = workdir / "zoo"
    print(f"building the tiny zoo in {zoo} (reused when it exists) ...", flush=True)
    build_zoo("tiny", zoo)
    log.setLevel(logging.WARNING)
    experts = expert_folders(zoo)
    print(f"zoo ready in {time.perf_counter() - started:.0f} s: a base, {len(experts)} experts, a mixture model\n")

    def row(name: str, seconds: str, model: Path) -> None:
        result = evaluate(model, zoo / "data")
        print(f"{name:<18}{seconds:>9}{result.macro_ce:>11.4f}{result.micro_ce:>11.4f}", flush=True)

    print(f"{'model':<18}{'merge s':>9}{'macro CE':>11}{'micro CE':>11}   (held-out, nats/token, lower is better)")
    row("base", "", zoo / "base")
    for method, params in METHODS.items():
        calibration = {e.name: zoo / "data" / e.name / "calib.jsonl" for e in experts} if is_calibrated(method) else {}
        config = MergeConfig(base=zoo / "base", experts=experts, method=method, params=params, calibration=calibration)
        merge_started = time.perf_counter()
        out = merge(config, workdir / f"merged-{method}", overwrite=True)
        row(method, f"{time.perf_counter() - merge_started:.2f}", out)
    row("mixture (multitask)", "", zoo / "mixture")

    head = MergeConfig(base=zoo / "base", experts=experts[:-1], method="ties", params=METHODS["ties"])
    merge(head, workdir / "ties-first8", overwrite=True, save_state=workdir / "ties-state")
    added = add_experts(workdir / "ties-state", [experts[-1]], workdir / "ties-incremental", overwrite=True)
    gap = max_difference(added, workdir / "merged-ties")
    print(f"\nincremental ties: {len(experts) - 1} experts, then {experts[-1].name} added from the saved state, vs "
          f"all {len(experts)} at once: max |difference| = {gap:g}")
    print(f"\nmerged checkpoints (AutoModelForCausalLM.from_pretrained loads them): {workdir}/merged-*")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
