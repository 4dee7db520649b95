"""Benchmark: is the zoo useful for merging research? The acceptance figures of the zoo issue.

Builds (or reuses) a zoo, evaluates every model on every domain, merges the uniform average of all experts,
and prints: each expert's in-domain CE against the base's (goal: at least 10 % lower), the average merge's
macro CE against the base's (goal: lower), and the mixture's against the average's (goal: at or below).

    .venv/bin/python bench/zoo_acceptance.py --preset small --zoo .mergeplan/zoo-s
    .venv/bin/python bench/zoo_acceptance.py --preset real --zoo .mergeplan/zoo-r --max-examples 32 \
        --accuracy-samples 0      # SmolLM2-135M forward runs at ~240 response tokens/s on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from merging import MergeConfig, merge
from merging.evaluate import evaluate
from merging.zoo.build import build_zoo
from merging.zoo.layout import expert_folders
from merging.zoo.matrix import evaluate_matrix


def _share(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--zoo", type=Path, default=Path(".mergeplan/zoo-s"))
    parser.add_argument("--accuracy-samples", type=int, default=50)
    parser.add_argument("--max-examples", type=int, help="eval examples per domain (default: the whole split)")
    args = parser.parse_args()
    started = time.perf_counter()
    build_zoo(args.preset, args.zoo)
    manifest = json.loads((args.zoo / "manifest.json").read_text())
    print(f"zoo ready in {time.perf_counter() - started:.0f} s (its models trained in "
          f"{manifest['training_seconds']:.0f} s in all)")
    options = {"accuracy_samples": args.accuracy_samples, "max_examples": args.max_examples}
    results = evaluate_matrix(args.zoo, **options)
    experts = expert_folders(args.zoo)
    average = merge(MergeConfig(base=args.zoo / "base", experts=experts, method="average"),
                    args.zoo / "merged-average", overwrite=True)
    results["average of all experts"] = evaluate(average, args.zoo / "data", **options)
    base = results["base"]

    print("\n| domain | base CE | expert CE (own domain) | change | expert exact match | base exact match |")
    print("|---|---|---|---|---|---|")
    changes = []
    for expert in experts:
        own = results[f"expert:{expert.name}"]
        change = own.ce(expert.name) / base.ce(expert.name) - 1
        changes.append(change)
        score = next(d for d in own.domains if d.domain == expert.name)
        base_score = next(d for d in base.domains if d.domain == expert.name)
        print(f"| {expert.name} | {base.ce(expert.name):.4f} | {own.ce(expert.name):.4f} | {change:+.1%} | "
              f"{_share(score.accuracy)} | {_share(base_score.accuracy)} |")
    print("\n| model | macro CE | micro CE | mean exact match |\n|---|---|---|---|")
    for name in ("base", "average of all experts", "mixture"):
        accuracies = [d.accuracy for d in results[name].domains if d.accuracy is not None]
        mean = sum(accuracies) / len(accuracies) if accuracies else None
        print(f"| {name} | {results[name].macro_ce:.4f} | {results[name].micro_ce:.4f} | {_share(mean, 3)} |")
    checks = {
        "every expert >= 10 % below the base in its domain": max(changes) <= -0.10,
        "average of all experts below the base (macro CE)": results["average of all experts"].macro_ce < base.macro_ce,
        "mixture at or below the average (macro CE)":
            results["mixture"].macro_ce <= results["average of all experts"].macro_ce,
    }
    print()
    for check, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}: {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
