"""Benchmark: the scaling law's theory against its fit, for the average merge of one zoo size.

merging.scaling_law.theory measures L(θ0), gᵀμ, ½μᵀHμ and ½Tr(HΣ) on the eval examples a sweep used, which give the
theory's floor L∞ and amplitude A; the sweep table gives the fitted ones (L(k) = L∞ + A/(k + b) on the macro
CE of the average method) and the measured mean CE per k. Prints the two side by side, the quadratic's
L(θ0 + μ) against the measured merge of all M, and the measured vs predicted mean per k; writes OUT.

    .venv/bin/python bench/law_theory.py --zoo .mergeplan/zoo-s --sweep bench/out/decisions/small_sweep.parquet \
        --out bench/out/law_theory/small.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from merging.scaling_law.backtest import macro_by_subset
from merging.scaling_law.curve import fit_curve
from merging.scaling_law.theory import check_theory
from merging.sweep.table import SUBSET_SEPARATOR, read_table
from merging.zoo.layout import zoo_families


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--sweep", type=Path, required=True, help="a sweep table with the average method")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", help="the zoo size (default: the first)")
    args = parser.parse_args()

    family = next((f for f in zoo_families(args.zoo) if args.size in (None, f.name)), None)
    if family is None:
        raise SystemExit(f"error: {args.zoo}: no size {args.size!r}")
    columns = read_table(args.sweep)
    eval_examples = int(columns["eval_examples"][0])
    macro = macro_by_subset(columns, family.name, "average")
    ks = np.array([label.count(SUBSET_SEPARATOR) + 1 for label in macro])
    losses = np.array(list(macro.values()))
    fit = fit_curve(ks, losses)
    started = time.perf_counter()
    theory = check_theory(family, args.zoo / "data", eval_examples)
    seconds = time.perf_counter() - started
    terms = theory.terms

    print(f"{family.name}: average, M = {terms.pool_size}, {eval_examples} eval examples per domain "
          f"(theory measured in {seconds:.0f} s)")
    print(f"  L(θ0) {terms.base_loss:.4f}   gᵀμ {terms.gradient_term:+.4f}   ½μᵀHμ {terms.curvature_term:+.4f}   "
          f"½Tr(HΣ) {terms.trace_term:.4f}")
    print(f"  {'':<8}{'theory':>10}{'fit':>10}")
    print(f"  {'L∞':<8}{terms.floor:>10.4f}{fit.params.floor:>10.4f}")
    print(f"  {'A':<8}{terms.amplitude:>10.4f}{fit.params.amplitude:>10.4f}   (fit b {fit.params.offset:.2f}, "
          f"R² {fit.r_squared:.4f})")
    print(f"  L(θ0 + μ): quadratic {theory.quadratic_all_loss:.4f}, measured {theory.merged_all_loss:.4f}")
    per_k = {int(k): float(losses[ks == k].mean()) for k in sorted(set(ks.tolist()))}
    print("  k   measured  theory   fit")
    for k, measured in per_k.items():
        print(f"  {k:<4}{measured:>8.4f}{terms.expected_loss(k):>8.4f}{float(fit.params.loss(k)):>8.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "zoo": str(args.zoo), "size": family.name, "sweep": str(args.sweep), "seconds": round(seconds, 1),
        "theory": theory.to_dict(),
        "fit": {"floor": fit.params.floor, "amplitude": fit.params.amplitude, "offset": fit.params.offset,
                "r_squared": fit.r_squared},
        "per_k": {k: {"measured": v, "theory": terms.expected_loss(k)} for k, v in per_k.items()}}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
