"""Backtest of the stop / continue decision: 20 seeded arrival orders of the 9 experts, replayed on a sweep table.

    mergeplan sweep --zoo ZOO --out SWEEP.parquet --design diverse --max-subsets 20 --seed 0 --workers 2
    python bench/decisions.py --sweep SWEEP.parquet --out bench/out/decisions/small

At each arrival k the decision is merging.scaling_law.decision.decide on the prefix points, as on_new_expert takes
it; the truth is the real gain of expert k + 1 in that order (merging/scaling_law/backtest.py). The old rule
(point estimate, no band, no check of the law) is replayed on the same fits. The rule is scored on min_gain
alone, then replayed with a target loss as well: per method, the level realising 80 % of the mean k = 1 → M
gain: mean L(1) − 0.8·(mean L(1) − L(M)). Writes OUT/decisions.json.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from merging.scaling_law.backtest import ACTIONS, backtest, macro_by_subset
from merging.scaling_law.decision import DecisionRule
from merging.sweep.table import SUBSET_SEPARATOR, read_table


def target_for(macro: dict[str, float]) -> float:
    singles = [loss for label, loss in macro.items() if SUBSET_SEPARATOR not in label]
    full = macro[max(macro, key=lambda label: label.count(SUBSET_SEPARATOR))]
    return float(np.mean(singles) - 0.8 * (np.mean(singles) - full))


def run_method(args: tuple[dict[str, float], str, DecisionRule, int, int]) -> dict:
    macro, method, rule, orders, seed = args
    started = time.perf_counter()
    result = backtest(macro, method, rule, orders, seed)
    targeted = backtest(macro, method, rule.model_copy(update={"target_loss": target_for(macro)}), orders, seed)
    return result.summary() | {
        "with_target": {key: value for key, value in targeted.summary().items()
                        if key in ("target_loss", "target_reached", "target_stops", "mean_regret", "mean_stop_k")},
        "decisions": result.decisions, "seconds": time.perf_counter() - started, "stop_k": result.stop_k,
        "legacy_stop_k": result.legacy_stop_k}


def print_summary(summary: dict) -> None:
    targeted = summary["with_target"]
    print(f"\n{summary['method']}: L(M) {summary['final_loss']:.4f}; min_gain alone:")
    print(f"  {'decision':<10}{'worth it':>9}{'not worth':>10}")
    for action in ACTIONS:
        cell = summary["confusion"][action]
        print(f"  {action:<10}{cell['worth']:>9}{cell['not_worth']:>10}")
    legacy = summary["legacy"]
    print(f"  old rule: stop {legacy['confusion']['stop']}, continue {legacy['confusion']['continue']}")
    print(f"  mean regret {summary['mean_regret']:.5f} nats (old rule {legacy['mean_regret']:.5f}); mean stop k "
          f"{summary['mean_stop_k']:.2f} (old rule {legacy['mean_stop_k']:.2f})")
    print(f"  with target {targeted['target_loss']:.4f} as well: reached at the stop in "
          f"{targeted['target_reached']}/{summary['orders']} orders, mean stop k {targeted['mean_stop_k']:.2f}, "
          f"mean regret {targeted['mean_regret']:.5f}")
    forecast = ", ".join(f"k={k}: law {_percent(error)} vs last value "
                         f"{_percent(summary['last_value_mean_abs_error'][k])}"
                         for k, error in summary["forecast_mean_abs_error"].items())
    print(f"  forecast of L(M), mean |relative error|: {forecast}")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--orders", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the sweep's design seed (the arrival orders)")
    parser.add_argument("--min-gain", type=float, default=0.002)
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", type=lambda text: text.split(","), help="default: every method of the sweep")
    args = parser.parse_args()
    columns = read_table(args.sweep)
    [size] = sorted(set(columns["size"]))
    methods = args.methods or list(dict.fromkeys(columns["method"]))
    rule = DecisionRule(min_gain=args.min_gain, resamples=args.resamples)
    started = time.perf_counter()
    jobs = [(macro_by_subset(columns, size, method), method, rule, args.orders, args.seed) for method in methods]
    with ProcessPoolExecutor(args.workers) as pool:
        summaries = list(pool.map(run_method, jobs))
    for summary in summaries:
        print_summary(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decisions.json").write_text(json.dumps(
        {"sweep": str(args.sweep), "size": size, "rule": rule.model_dump(), "methods": summaries}, indent=1))
    print(f"\n{len(methods)} methods x {args.orders} orders in {time.perf_counter() - started:.0f} s; "
          f"wrote {args.out / 'decisions.json'}")


if __name__ == "__main__":
    main()
