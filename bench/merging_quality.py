"""Merging quality on a zoo: every method's held-out macro CE and exact match, mean ± std over seeds.

Training-free methods get their λ chosen on the calibration split (response CE), never on eval data;
expert_merging(_pp) start from ᾱ = that Task Arithmetic λ (the spec: ᾱ is the TA coefficient). Also
the sample-count curve (N per domain) and the effect of gamma for expert_merging_pp.

    .venv/bin/python bench/merging_quality.py --zoo .mergeplan/zoo-s --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from pathlib import Path

from merging import merge
from merging.config import MergeConfig
from merging.evaluate import EvalResult, evaluate
from merging.zoo import expert_folders

LAMBDAS = {"task_arithmetic": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5],
           "ties": [0.25, 0.5, 0.75, 1.0], "dare_ties": [0.25, 0.5, 0.75, 1.0]}
DENSITY = 0.2


class Bench:
    def __init__(self, zoo: Path, out: Path, accuracy_samples: int, max_examples: int | None):
        self.zoo, self.out = zoo, out
        self.experts = expert_folders(zoo)
        self.domains = [p.name for p in self.experts]
        self.accuracy_samples, self.max_examples = accuracy_samples, max_examples

    def evaluate(self, folder: Path, split: str = "eval", domains: list[str] | None = None,
                 accuracy: bool = True) -> EvalResult:
        """Eval split: CE and (when `accuracy`) exact match; the calib split: CE only, for tuning."""
        held_out = split == "eval"
        return evaluate(folder, self.zoo / "data", domains, split=split,
                        accuracy_samples=self.accuracy_samples if held_out and accuracy else 0,
                        max_examples=self.max_examples if held_out else None)

    def merge(self, name: str, method: str, params: dict, seed: int = 0) -> tuple[Path, dict]:
        config = MergeConfig(base=self.zoo / "base", experts=[{"path": p} for p in self.experts], method=method,
                             params=params, seed=seed,
                             calibration={d: self.zoo / "data" / d / "calib.jsonl" for d in self.domains}
                             if method.startswith("expert_merging") else {})
        folder = self.out / "models" / name
        merge(config, folder, overwrite=True)
        report = folder / "calibration.json"
        return folder, json.loads(report.read_text()) if report.exists() else {}

    def tune_lambda(self, method: str, params: dict, seed: int = 0) -> float:
        scores = {}
        for scale in LAMBDAS[method]:
            folder, _ = self.merge(f"tune-{method}", method, {**params, "lambda": scale}, seed)
            scores[scale] = self.evaluate(folder, split="calib").macro_ce
        best = min(scores, key=scores.get)
        print(f"  {method}: calibration-split macro CE by λ {json.dumps(scores)} -> λ = {best}", flush=True)
        return best


def summary(results: list[EvalResult]) -> dict:
    macro = [r.macro_ce for r in results]
    accuracy = [statistics.mean(d.accuracy for d in r.domains) for r in results
                if all(d.accuracy is not None for d in r.domains)]
    return {"macro_ce": statistics.mean(macro), "macro_ce_std": statistics.stdev(macro) if len(macro) > 1 else 0.0,
            "accuracy": statistics.mean(accuracy) if accuracy else None,
            "accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0, "runs": len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path(".mergeplan/zoo-s"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("bench/out/merging_quality"))
    parser.add_argument("--accuracy-samples", type=int, default=50)
    parser.add_argument("--max-examples", type=int, default=None, help="eval examples per domain (default all)")
    parser.add_argument("--sections", default="main,calibrated,curves,ceiling,timing",
                        help="main (references, training-free), calibrated (EM, EM++), curves (N, gamma), ceiling, "
                             "timing (medians of 3 calibrations; run on an idle machine); "
                             "rows are added to an existing results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    sections = set(args.sections.split(","))
    bench = Bench(args.zoo, args.out, args.accuracy_samples, args.max_examples)
    results_path = args.out / "results.json"
    rows: dict[str, dict] = json.loads(results_path.read_text()) if results_path.exists() else {}

    def record(name: str, results: list[EvalResult], **extra) -> None:
        rows[name] = {**summary(results), **extra}
        row = rows[name]
        accuracy = "" if row["accuracy"] is None else f"  exact match {row['accuracy']:.3f} ± {row['accuracy_std']:.3f}"
        print(f"{name:<34} macro CE {row['macro_ce']:.4f} ± {row['macro_ce_std']:.4f}{accuracy}", flush=True)
        results_path.write_text(json.dumps(rows, indent=2) + "\n")

    args.out.mkdir(parents=True, exist_ok=True)
    if "main" in sections:
        main_rows(bench, seeds, record)
    ta_lambda = next(row["scale"] for name, row in rows.items() if name.startswith("task_arithmetic"))

    def calibrated(method: str, params: dict, label: str, accuracy: bool = True) -> None:
        results, seconds, memory = [], [], []
        for seed in seeds:
            started = time.perf_counter()
            folder, report = bench.merge(f"{method}-{seed}", method, {"init": ta_lambda, **params}, seed)
            seconds.append(report["seconds"])
            memory.append(report["peak_memory_mb"])
            results.append(bench.evaluate(folder, accuracy=accuracy))
            print(f"    seed {seed}: calibration {report['seconds']:.1f} s, merge total "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
        record(label, results, calibration_seconds=statistics.median(seconds), peak_memory_mb=max(memory))

    if "calibrated" in sections:
        calibrated("expert_merging", {}, f"expert_merging (ᾱ={ta_lambda})")
        calibrated("expert_merging_pp", {}, f"expert_merging_pp (ᾱ={ta_lambda})")
    if "curves" in sections:
        for count in (1, 2, 5, 10):
            calibrated("expert_merging_pp", {"samples_per_expert": count}, f"em++ N={count}", accuracy=False)
        for gamma in (0.0, 0.8, 5.0):
            calibrated("expert_merging_pp", {"gamma": gamma}, f"em++ gamma={gamma}", accuracy=False)
    if "timing" in sections:  # run it on an idle machine: calibration seconds are wall time
        for method, mode in (("expert_merging", "full"), ("expert_merging_pp", "full"),
                             ("expert_merging_pp", "blockwise")):
            reports = [bench.merge(f"timing-{method}", method, {"init": ta_lambda, "mode": mode})[1] for _ in range(3)]
            rows[f"timing {method} {mode}"] = timing = {
                "calibration_seconds": statistics.median(r["seconds"] for r in reports),
                **{key: reports[0][key] for key in ("task_vectors_mb", "peak_memory_mb", "sample_tokens")}}
            print(f"timing {method} ({mode}): {json.dumps(timing)}", flush=True)
        results_path.write_text(json.dumps(rows, indent=2) + "\n")
    if "ceiling" in sections:
        record("supervised ceiling (α fit to labels)", [bench.evaluate(supervised_ceiling(bench, ta_lambda))])
    shutil.rmtree(args.out / "models", ignore_errors=True)
    print(f"wrote {results_path}")


def supervised_ceiling(bench: Bench, init: float, epochs: int = 8) -> Path:
    """Not a merging method: one α per (tensor, expert) fit with Adam to the labelled response CE of the whole
    calibration split. It bounds what any layer-wise coefficients can reach on this zoo."""
    import torch

    from merging.calibration import Coefficients, calibrated_tensors
    from merging.calibration.expert_merging import MergedModel, TrainableCoefficients, load_task_vectors, logit
    from merging.calibration.params import DEFAULT_EXCLUDE
    from merging.checkpoint import CheckpointReader
    from merging.data.loading import IGNORE_INDEX, collate, encode, load_split
    from merging.hf import load_causal_lm, load_tokenizer
    from merging.merger import apply_coefficients

    base = CheckpointReader(bench.zoo / "base")
    names = calibrated_tensors(base, set(base.names()), list(DEFAULT_EXCLUDE))
    vectors = load_task_vectors(base, [CheckpointReader(p) for p in bench.experts], names, torch.device("cpu"),
                                torch.float32)
    student = MergedModel(load_causal_lm(bench.zoo / "base").eval().requires_grad_(False), vectors)
    coefficients = TrainableCoefficients({n: torch.full((len(bench.experts), 1), logit(init)) for n in names}, {})
    optimizer = torch.optim.Adam(coefficients.parameters(), lr=0.05)
    tokenizer = load_tokenizer(bench.zoo / "base")
    batches = [collate([encode(tokenizer, e, 192)], tokenizer.pad_token_id)
               for d in bench.domains for e in load_split(bench.zoo / "data", d, "calib")]
    for epoch in range(epochs):
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(epoch)).tolist()
        for step, i in enumerate(order, start=1):
            logits = student(coefficients.alpha(), batches[i]["input_ids"], hidden=False).logits[0, :-1]
            torch.nn.functional.cross_entropy(logits, batches[i]["labels"][0, 1:], ignore_index=IGNORE_INDEX
                                              ).backward()
            if step % 8 == 0 or step == len(order):
                optimizer.step()
                optimizer.zero_grad()
    config = MergeConfig(base=bench.zoo / "base", experts=[{"path": p} for p in bench.experts],
                         method="expert_merging")
    learned = Coefficients(config, bench.domains, {n: a.detach() for n, a in coefficients.alpha().items()})
    return apply_coefficients(learned, bench.out / "models" / "ceiling", overwrite=True)


def main_rows(bench: Bench, seeds: list[int], record) -> None:
    record("base", [bench.evaluate(bench.zoo / "base")])
    own = [bench.evaluate(folder, domains=[folder.name]) for folder in bench.experts]
    experts_own = EvalResult("experts", "eval", [r.domains[0] for r in own])
    record("each expert on its own domain", [experts_own])
    record("mixture (multitask training)", [bench.evaluate(bench.zoo / "mixture")])

    folder, _ = bench.merge("average", "average", {})
    record("average", [bench.evaluate(folder)])
    ta_lambda = bench.tune_lambda("task_arithmetic", {})
    folder, _ = bench.merge("task_arithmetic", "task_arithmetic", {"lambda": ta_lambda})
    record(f"task_arithmetic (λ={ta_lambda})", [bench.evaluate(folder)], scale=ta_lambda)
    ties_lambda = bench.tune_lambda("ties", {"density": DENSITY})
    folder, _ = bench.merge("ties", "ties", {"density": DENSITY, "lambda": ties_lambda})
    record(f"ties (d={DENSITY}, λ={ties_lambda})", [bench.evaluate(folder)], scale=ties_lambda)
    dare_lambda = bench.tune_lambda("dare_ties", {"density": DENSITY})
    dare = [bench.evaluate(bench.merge(f"dare_ties-{s}", "dare_ties", {"density": DENSITY, "lambda": dare_lambda},
                                       s)[0]) for s in seeds]
    record(f"dare_ties (d={DENSITY}, λ={dare_lambda})", dare, scale=dare_lambda)


if __name__ == "__main__":
    main()
