"""Benchmark: does the merging scaling law hold on our zoos? The acceptance figures of the scaling-law issue.

1. `small` zoo (M = 9): a 4-method subset sweep (all C(9, k) subsets up to --max-subsets per k, diverse-permutation
   prefixes above it), timed; the per-N fit of the macro cross-domain CE per method: R², the three-point forecast's
   error at k = 9, the spread over subsets by k, k80/k90. Goals: R² >= 0.98, |forecast error| <= 1 %, the spread
   shrinking with k, the sweep under 30 minutes.
2. `sizes` zoo (three base sizes): a sweep (balanced design by default) and the joint fit over N. Goals: joint
   R² >= 0.95, floor decreasing in N.

Tables, fit folders (fit.json, summary.csv, plots) and results.json/results.md go to --out. Sweeps resume: run
again with the same settings and finished subsets are skipped (their time is then not in the rate).

    .venv/bin/python bench/scaling_law.py --small .mergeplan/zoo-s --sizes .mergeplan/zoo-n
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from merging.scaling_law.fit_folder import FitSettings, fit_sweep
from merging.scaling_law.sweep_curves import MACRO
from merging.sweep.run import DEFAULT_METHODS, SweepReport, SweepSettings, parse_method_params, run_sweep
from merging.zoo.layout import zoo_families


def sweep_and_fit(name: str, zoo: Path, out: Path, settings: SweepSettings, resamples: int) -> tuple[dict, dict]:
    """Sweep one zoo, fit it, and return (timing, fit.json)."""
    print(f"\n## {name}: sweep of {zoo} ({', '.join(settings.methods)}; design {settings.design}, "
          f"max {settings.max_subsets} subsets per k, {settings.eval_examples} eval examples per domain)", flush=True)
    report: SweepReport = run_sweep(zoo_families(zoo), zoo / "data", out / f"{name}_sweep.parquet", settings)
    timing = {"groups": report.groups, "computed": report.computed, "skipped": report.skipped,
              "seconds": round(report.seconds, 1), "models_per_minute": round(report.models_per_minute, 2)}
    print(f"sweep: {report.groups} merged models ({report.computed} measured now in {report.seconds:.0f} s = "
          f"{report.seconds / 60:.1f} min, {report.models_per_minute:.1f} merged and evaluated per minute)", flush=True)
    started = time.perf_counter()
    fit_sweep(report.path, out / f"{name}_fit", FitSettings(resamples=resamples), overwrite=True)
    timing["fit_seconds"] = round(time.perf_counter() - started, 1)
    print(f"fit: {timing['fit_seconds']:.0f} s -> {out / f'{name}_fit'}", flush=True)
    return timing, json.loads((out / f"{name}_fit" / "fit.json").read_text())


def timing_of_whole_sweep(timing: dict, previous: dict | None) -> dict:
    """A resumed run that measured nothing keeps the timing of the run that measured the sweep."""
    if timing["computed"] == 0 and previous is not None:
        return previous["timing"] | {"fit_seconds": timing["fit_seconds"]}
    return timing


def spread_shrinks(std: list[float | None]) -> tuple[bool, float]:
    """(non-increasing over k = 1 … M−1, std(M−1)/std(1)); k = M has one subset and no spread."""
    below_pool = [s for s in std[:-1] if s is not None]
    steps = [later <= earlier for earlier, later in zip(below_pool, below_pool[1:], strict=False)]
    return all(steps), below_pool[-1] / below_pool[0]


def small_results(document: dict) -> dict:
    [size] = document["sizes"]
    results = {}
    print("\n| method | R² (macro) | floor L∞ [95 % CI] | A | b | 3-point forecast error at k = 9 | "
          "std over subsets, k = 1 … 8 | shrinks | k80 / k90 (fitted) | k80 / k90 (measured) | "
          "median R² of the 9 domain curves |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method, curves in document["curves"][size].items():
        macro = curves[MACRO]
        monotone, ratio = spread_shrinks(macro["points"]["std"])
        forecast = macro["forecast"].get("relative_error_at_pool")
        fitted, measured = macro["realisation"]["fitted"], macro["realisation"]["measured"]
        domain_r2 = statistics.median(c["r_squared"] for d, c in curves.items()
                                      if d != MACRO and c["r_squared"] is not None)
        results[method] = {
            "r_squared": macro["r_squared"], "params": macro["params"], "ci": macro["ci"],
            "forecast_relative_error_at_9": forecast, "std_by_k": macro["points"]["std"],
            "mean_by_k": macro["points"]["mean"], "count_by_k": macro["points"]["count"],
            "spread_non_increasing": monotone, "spread_ratio_last_to_first": ratio,
            "variance_law": macro["variance"], "k80_fitted": fitted.get("k80"), "k90_fitted": fitted.get("k90"),
            "k80_measured": measured.get("k80"), "k90_measured": measured.get("k90"),
            "median_domain_r_squared": domain_r2,
        }
        p, ci = macro["params"], macro["ci"]
        interval = f"[{ci['floor'][0]:.4f}, {ci['floor'][1]:.4f}]" if ci else ""
        stds = ", ".join(f"{s:.4f}" for s in macro["points"]["std"][:-1])
        error = "n/a" if forecast is None else f"{forecast:+.2%}"
        print(f"| {method} | {macro['r_squared']:.4f} | {p['floor']:.4f} {interval} | {p['amplitude']:.4f} | "
              f"{p['offset']:.2f} | {error} | {stds} | {'yes' if monotone else 'no'} (x{ratio:.2f}) | "
              f"{fitted.get('k80')} / {fitted.get('k90')} | {measured.get('k80')} / {measured.get('k90')} | "
              f"{domain_r2:.3f} |")
    return results


def sizes_results(document: dict) -> dict:
    results = {}
    print("\n| method | joint R² (macro) | L* | B | β | A0 | γ | b | floor by size (fitted) | decreasing in N | "
          "per-size R² |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method, by_domain in document["joint"].items():
        joint = by_domain[MACRO]
        per_size = {size: document["curves"][size][method][MACRO]["r_squared"] for size in document["sizes"]}
        results[method] = {**joint, "per_size_r_squared": per_size}
        p = joint["params"]
        floors = ", ".join(f"{size} ({document['sizes'][size]['n_params_b'] * 1000:.2f}M) {floor:.4f}"
                           for size, floor in joint["floor_by_size"].items())
        print(f"| {method} | {joint['r_squared']:.4f} | {p['floor_limit']:.4f} | {p['floor_scale']:.4g} | "
              f"{p['floor_exponent']:.3f} | {p['amplitude_scale']:.4g} | {p['amplitude_exponent']:.3f} | "
              f"{p['offset']:.2f} | {floors} | {'yes' if joint['floor_decreasing_in_n'] else 'no'} | "
              + ", ".join(f"{size} {r2:.3f}" for size, r2 in per_size.items()) + " |")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=Path, default=Path(".mergeplan/zoo-s"))
    parser.add_argument("--sizes", type=Path, default=Path(".mergeplan/zoo-n"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/scaling_law"))
    parser.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=DEFAULT_METHODS)
    parser.add_argument("--max-subsets", type=int, default=24, help="small zoo: subsets per k at most")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                        help="small zoo: method params replacing the defaults, e.g. ties.lambda=0.5; repeatable")
    parser.add_argument("--name", default="small", help="small zoo: name of its tables, fit folder and results")
    parser.add_argument("--eval-examples", type=int, default=64, help="eval examples per domain")
    parser.add_argument("--sizes-methods", type=lambda s: tuple(s.split(",")), default=("average", "task_arithmetic"))
    parser.add_argument("--sizes-design", default="balanced")
    parser.add_argument("--sizes-max-subsets", type=int, help="sizes zoo, design all or diverse: subsets per k at most")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="sweep processes, 1 torch thread each (default 2)")
    parser.add_argument("--threads", type=int, help="torch CPU threads of this process (default: torch's choice)")
    parser.add_argument("--skip-small", action="store_true")
    parser.add_argument("--skip-sizes", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "workers": args.workers,
                          "load_average_at_start": os.getloadavg()}
    checks = {}
    if not args.skip_small:
        settings = SweepSettings(methods=args.methods, params=parse_method_params(args.param),
                                 max_subsets=args.max_subsets, eval_examples=args.eval_examples,
                                 workers=args.workers)
        name = args.name
        timing, document = sweep_and_fit(name, args.small, args.out, settings, args.resamples)
        timing = timing_of_whole_sweep(timing, results.get(name))
        per_method = small_results(document)
        results[name] = {"settings": settings.model_dump(), "method_params": {
            m: settings.method_params(m) for m in settings.methods}, "timing": timing, "methods": per_method}
        checks |= {
            f"{name}: per-N macro R² >= 0.98 for every method": all(r["r_squared"] >= 0.98
                                                                    for r in per_method.values()),
            f"{name}: three-point forecast of k = 9 within 1 %": all(
                r["forecast_relative_error_at_9"] is not None and abs(r["forecast_relative_error_at_9"]) <= 0.01
                for r in per_method.values()),
            f"{name}: spread over subsets non-increasing in k": all(r["spread_non_increasing"]
                                                                  for r in per_method.values()),
        }
        if timing["computed"] == timing["groups"]:
            checks[f"{name}: whole {len(settings.methods)}-method sweep under 30 minutes"] = timing["seconds"] < 1800
    if not args.skip_sizes:
        settings = SweepSettings(methods=args.sizes_methods, design=args.sizes_design,
                                 max_subsets=args.sizes_max_subsets, eval_examples=args.eval_examples,
                                 workers=args.workers)
        timing, document = sweep_and_fit("sizes", args.sizes, args.out, settings, args.resamples)
        timing = timing_of_whole_sweep(timing, results.get("sizes"))
        joint = sizes_results(document)
        results["sizes"] = {"settings": settings.model_dump(), "timing": timing, "methods": joint}
        checks |= {"sizes: joint R² >= 0.95": all(r["r_squared"] >= 0.95 for r in joint.values()),
                   "sizes: floor decreasing in N": all(r["floor_decreasing_in_n"] for r in joint.values())}
    results["checks"] = results.get("checks", {}) | checks  # sections skipped this time keep their verdicts
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + "\n".join(f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in results["checks"].items()))
    print(f"wrote {results_path}")
    return 0 if all(results["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
