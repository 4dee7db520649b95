"""Merging quality on a zoo: every method's held-out macro CE and exact match, mean ± std over seeds.

Every knob is chosen on the calibration split (response CE of its first --tune-examples examples per domain),
never on eval data: the training-free methods' λ (and density), the calibrated methods' epoch count, picked
from Expert Merging's per-epoch snapshots (seed 0), and the weight γ of EM / EM++'s pull towards ᾱ, picked from
one Expert Merging run (seed 0) per grid value. expert_merging(_pp) and adamerging start from ᾱ = the tuned
Task Arithmetic λ (the spec: ᾱ is the TA coefficient). Each calibrated merge runs in its own `mergeplan merge`
process, so its calibration.json's peak RSS is its own. The paired section gives per-(seed, domain) CE
differences with a two-level bootstrap 95% interval; the matrix section writes the merged models' CE and
exact-match tables over the domains (in-domain on the diagonal of the experts' rows is in the zoo matrix).

    .venv/bin/python bench/merging_quality.py --zoo .mergeplan/zoo-r --max-examples 20 --accuracy-samples 10
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from merging import merge
from merging.config import MergeConfig
from merging.evaluate import EvalResult, evaluate
from merging.merger import apply_coefficients
from merging.zoo.layout import expert_folders
from merging.zoo.matrix import write_matrix

TUNING_GRID = {
    "task_arithmetic": [{"lambda": s} for s in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)],
    "ties": [{"density": d, "lambda": s} for d in (0.2, 0.5) for s in (0.5, 1.0)],
    "dare_ties": [{"density": d, "lambda": s} for d in (0.2, 0.5) for s in (0.5, 1.0)],
}
CALIBRATED = ("expert_merging", "expert_merging_pp", "adamerging")
RANK_FAMILY = ("expert_merging", "expert_merging_pp")  # --methods METHOD:rank: one α per LoRA component
BOOTSTRAP_REPS = 10_000


class Bench:
    def __init__(self, zoo: Path, out: Path, accuracy_samples: int, max_examples: int | None, tune_examples: int,
                 eval_dtype: str = "float32", eval_batch_size: int = 32):
        self.zoo, self.out = zoo.resolve(), out  # absolute: the child merges' configs live under `out`
        self.eval_dtype, self.eval_batch_size = eval_dtype, eval_batch_size
        self.experts = expert_folders(self.zoo)
        self.domains = [p.name for p in self.experts]
        self.accuracy_samples, self.max_examples, self.tune_examples = accuracy_samples, max_examples, tune_examples

    def evaluate(self, folder: Path, split: str = "eval", domains: list[str] | None = None,
                 accuracy: bool = True) -> EvalResult:
        """Eval split: CE and (when `accuracy`) exact match; the calib split: CE only, for tuning."""
        held_out = split == "eval"
        return evaluate(folder, self.zoo / "data", domains, split=split, dtype=self.eval_dtype,
                        batch_size=self.eval_batch_size,
                        accuracy_samples=self.accuracy_samples if held_out and accuracy else 0,
                        max_examples=self.max_examples if held_out else self.tune_examples)

    def score(self, folder: Path) -> dict:
        """Calibration-split CE (what every choice is made on) and held-out CE, for a selection point."""
        return {"calib_ce": self.evaluate(folder, split="calib").macro_ce,
                "eval_ce": self.evaluate(folder, accuracy=False).macro_ce}

    def config(self, method: str, params: dict, seed: int) -> MergeConfig:
        calibration = {d: self.zoo / "data" / d / "calib.jsonl" for d in self.domains} if method in CALIBRATED else {}
        return MergeConfig(base=self.zoo / "base", experts=[{"path": p} for p in self.experts], method=method,
                           params=params, seed=seed, calibration=calibration)

    def merge(self, name: str, method: str, params: dict, seed: int = 0) -> Path:
        return merge(self.config(method, params, seed), self.out / "models" / name, overwrite=True)

    def merge_in_child(self, name: str, method: str, params: dict, seed: int) -> tuple[Path, dict]:
        """`mergeplan merge` in its own process: the report's peak RSS is this merge's alone."""
        config = self.config(method, params, seed).model_dump(mode="json", exclude_defaults=True)
        config_file = self.out / "configs" / f"{name}.json"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(json.dumps(config, indent=2))
        folder = self.out / "models" / name
        cli = Path(sys.executable).with_name("mergeplan")
        subprocess.run([str(cli), "merge", str(config_file), str(folder), "--overwrite"], check=True,
                       stdout=subprocess.DEVNULL)
        return folder, json.loads((folder / "calibration.json").read_text())

    def tune(self, method: str, seed: int = 0) -> tuple[dict, Path]:
        """The grid point with the lowest calibration-split macro CE, and its merged folder."""
        scores, best = [], None
        for i, params in enumerate(TUNING_GRID[method]):
            folder = self.merge(f"tune-{method}-{i}", method, params, seed)
            scores.append(self.evaluate(folder, split="calib").macro_ce)
            if best is None or scores[-1] < scores[best]:
                if best is not None:
                    shutil.rmtree(self.out / "models" / f"tune-{method}-{best}")
                best = i
            else:
                shutil.rmtree(folder)
        grid = ", ".join(f"{json.dumps(p)}: {s:.4f}" for p, s in zip(TUNING_GRID[method], scores, strict=True))
        print(f"  {method}: calibration-split macro CE {grid} -> {TUNING_GRID[method][best]}", flush=True)
        return TUNING_GRID[method][best], self.out / "models" / f"tune-{method}-{best}"


def summary(results: list[EvalResult]) -> dict:
    macro = [r.macro_ce for r in results]
    accuracy = [statistics.mean(d.accuracy for d in r.domains) for r in results
                if all(d.accuracy is not None for d in r.domains)]
    return {"macro_ce": statistics.mean(macro), "macro_ce_std": statistics.stdev(macro) if len(macro) > 1 else 0.0,
            "accuracy": statistics.mean(accuracy) if accuracy else None,
            "accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0, "runs": len(results),
            "domains": {d.domain: statistics.mean(r.ce(d.domain) for r in results) for d in results[0].domains},
            "results": [r.to_dict() for r in results]}


def domain_table(row: dict) -> np.ndarray:
    """(runs, domains) held-out CE of a row."""
    return np.array([[d["ce"] for d in result["domains"]] for result in row["results"]])


def paired_difference(row: dict, reference: dict) -> dict:
    """CE(row) − CE(reference) per (seed, domain), run i paired with run i (a one-run reference pairs with each).
    The interval is a two-level bootstrap: resample the seeds, then the domains, with replacement."""
    ours, theirs = domain_table(row), domain_table(reference)
    if len(theirs) == 1:
        theirs = np.repeat(theirs, len(ours), axis=0)
    runs = min(len(ours), len(theirs))
    differences = ours[:runs] - theirs[:runs]
    rng = np.random.default_rng(0)
    seeds = rng.integers(0, runs, (BOOTSTRAP_REPS, runs))
    domains = rng.integers(0, differences.shape[1], (BOOTSTRAP_REPS, differences.shape[1]))
    means = differences[seeds[:, :, None], domains[:, None, :]].mean(axis=(1, 2))
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(differences.mean()), "low": float(low), "high": float(high),
            "per_seed": differences.mean(axis=1).round(5).tolist(),
            "per_domain": dict(zip(row["domains"], differences.mean(axis=0).round(5).tolist(), strict=True))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path(".mergeplan/zoo-s"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("bench/out/merging_quality"))
    parser.add_argument("--accuracy-samples", type=int, default=50)
    parser.add_argument("--max-examples", type=int, default=None, help="eval examples per domain (default all)")
    parser.add_argument("--tune-examples", type=int, default=None,
                        help="calib-split examples per domain used for every choice (default all)")
    parser.add_argument("--eval-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="every evaluation's dtype (bfloat16 at batch 8 on Gemma's 262k vocabulary: 1.5x faster)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--curve-epochs", default="1,2,3,5,10",
                        help="epochs at which seed 0's Expert Merging snapshot is scored (one run to the largest)")
    parser.add_argument("--select-epochs", default="1,2,3",
                        help="the epoch counts the calibrated methods may be given (chosen by calib-split CE)")
    parser.add_argument("--init", type=float, default=None,
                        help="ᾱ of the calibrated methods and the ceiling (default: the tuned TA λ in results.json)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the calibrated methods (default: the select section's choice in results.json)")
    parser.add_argument("--select-gammas", default="0,0.8,5",
                        help="the γ values the gamma section scores (EM seed 0; chosen by calib-split CE)")
    parser.add_argument("--gamma", type=float, default=None,
                        help="γ of EM and EM++ and of the select section's run (default: the gamma section's "
                             "choice in results.json, else the spec's)")
    parser.add_argument("--methods", default=",".join(CALIBRATED),
                        help="the calibrated section's methods; expert_merging:rank, expert_merging_pp:rank: the "
                             "same with params.coefficients: rank (one α per LoRA component), rows labelled "
                             "'expert_merging (rank) (...)'")
    parser.add_argument("--defaults", action="store_true",
                        help="the calibrated section runs each method at the product's defaults (params: {} but the "
                             "family: γ auto, ᾱ auto (AdaMerging 0.3), 1 epoch), rows labelled 'METHOD (product "
                             "defaults)'")
    parser.add_argument("--with", dest="extra", type=json.loads, default={},
                        help="JSON params added to every calibrated merge, named in its row's label, e.g. "
                             "'{\"init\": \"auto\"}' with --defaults: 'METHOD (product defaults, init=auto)'")
    parser.add_argument("--ceiling-family", choices=("tensor", "rank"), default="tensor",
                        help="the ceiling section's coefficients: one per (tensor, expert) or per LoRA component")
    parser.add_argument("--curve-samples", default="1,2,5,10", help="the curves section's samples per domain")
    parser.add_argument("--curve-gammas", default="0,0.8,5", help="the curves section's γ values")
    parser.add_argument("--sections", default="main,select,gamma,calibrated,paired,matrix",
                        help="main (references, training-free), select (epoch curve and choice), gamma (γ choice), "
                             "calibrated (EM, EM++, AdaMerging over seeds), paired, matrix, curves (EM++ sample "
                             "count and gamma), ceiling (α fit to the labels of the --tune-examples); rows are added "
                             "to an existing results.json (main keeps the rows it has: delete one to remeasure)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")]
    sections = args.sections.split(",")
    bench = Bench(args.zoo, args.out, args.accuracy_samples, args.max_examples, args.tune_examples, args.eval_dtype,
                  args.eval_batch_size)
    results_path = args.out / "results.json"
    rows: dict[str, dict] = json.loads(results_path.read_text()) if results_path.exists() else {}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results_path.write_text(json.dumps(rows, indent=2) + "\n")

    def record(name: str, results: list[EvalResult], **extra) -> None:
        rows[name] = {**summary(results), **extra}
        row = rows[name]
        accuracy = "" if row["accuracy"] is None else f"  exact match {row['accuracy']:.3f} ± {row['accuracy_std']:.3f}"
        print(f"{name:<44} macro CE {row['macro_ce']:.4f} ± {row['macro_ce_std']:.4f}{accuracy}", flush=True)
        save()

    def tuned_lambda() -> float:
        tuned = [row["params"]["lambda"] for row in rows.values() if row.get("method") == "task_arithmetic"]
        if args.init is None and not tuned:
            parser.error(f"{results_path}: no task_arithmetic row; run --sections main first or give --init")
        return args.init if args.init is not None else tuned[0]

    def epochs() -> int:
        return args.epochs or selected_epochs(rows)

    def pull(method: str) -> dict:
        """EM / EM++'s γ when one was chosen (AdaMerging has no pull towards ᾱ)."""
        gamma = args.gamma if args.gamma is not None else rows.get("gamma selection", {}).get("selected")
        return {"gamma": gamma} if gamma is not None and method != "adamerging" else {}

    def calibrated_label(method: str, family: str = "") -> str:
        gamma = pull(method).get("gamma")
        named = f"{method} ({family})" if family else method
        extra = "".join(f", {key}={value}" for key, value in args.extra.items())
        if args.defaults:
            return f"{named} (product defaults{extra})"
        return f"{named} (ᾱ={tuned_lambda()}, {epochs()} epochs{'' if gamma is None else f', γ={gamma}'}{extra})"

    def calibrated(method: str, params: dict, label: str, accuracy: bool = True) -> None:
        results, seconds, memory, gammas, inits = [], [], [], [], []
        params = params if args.defaults else {"init": tuned_lambda(), **params}
        family = "-rank" if params.get("coefficients") == "rank" else ""
        family += "".join(f"-{key}-{value}" for key, value in args.extra.items())
        for seed in seeds:
            started = time.perf_counter()
            folder, report = bench.merge_in_child(f"{method}{family}-{seed}", method, params, seed)
            seconds.append(report["seconds"])
            memory.append(report["peak_memory_mb"])
            gammas.append((report.get("gamma_choice") or {}).get("chosen"))
            inits.append((report.get("init_choice") or {}).get("chosen"))
            results.append(bench.evaluate(folder, accuracy=accuracy))
            print(f"    {label} seed {seed}: calibration {report['seconds']:.1f} s, peak RSS "
                  f"{report['peak_memory_mb']:.0f} MB, merge {time.perf_counter() - started:.1f} s, "
                  f"γ {report['params'].get('gamma')}{' (auto)' if gammas[-1] is not None else ''}", flush=True)
        record(label, results, method=method, params=params,
               calibration_seconds=statistics.median(seconds), calibration_seconds_all=seconds,
               peak_memory_mb=max(memory), **({"gamma_chosen": gammas} if any(g is not None for g in gammas) else {}),
               **({"init_chosen": inits} if any(i is not None for i in inits) else {}))

    for section in sections:
        if section == "main":
            main_rows(bench, seeds, record, rows)
        elif section == "select":
            curve, allowed = ([int(e) for e in text.split(",")] for text in (args.curve_epochs, args.select_epochs))
            rows["epoch selection"] = select_epochs(bench, tuned_lambda(), curve, allowed, pull("expert_merging"))
            save()
        elif section == "gamma":
            grid = [float(g) for g in args.select_gammas.split(",")]
            rows["gamma selection"] = select_gamma(bench, tuned_lambda(), epochs(), grid)
            save()
        elif section == "calibrated":
            for entry in args.methods.split(","):
                method, _, family = entry.partition(":")
                if method not in CALIBRATED or family not in ("", "rank") or (family and method not in RANK_FAMILY):
                    parser.error(f"--methods: {entry!r} is not one of {', '.join(CALIBRATED)} (or "
                                 f"{':rank, '.join(RANK_FAMILY)}:rank)")
                coefficients = {"coefficients": family} if family else {}
                chosen = {} if args.defaults else {"epochs": epochs(), **pull(method)}
                calibrated(method, {**chosen, **coefficients, **args.extra}, calibrated_label(method, family))
        elif section == "paired":
            labels = [calibrated_label(m) for m in CALIBRATED] + [calibrated_label(m, "rank") for m in RANK_FAMILY]
            rows["paired differences"] = paired_rows(rows, labels)
            save()
        elif section == "matrix":
            chosen = {name: EvalResult.from_dict(row["results"][0]) for name, row in rows.items()
                      if "results" in row and not name.startswith("each expert")}  # seed 0 of each model
            write_matrix(chosen, args.out / "ce_matrix.csv", args.out / "ce_matrix.png")
            print(f"wrote {args.out / 'ce_matrix.csv'}", flush=True)
        elif section == "curves":
            for count in (int(n) for n in args.curve_samples.split(",")):
                calibrated("expert_merging_pp", {"epochs": epochs(), "samples_per_expert": count},
                           f"em++ N={count}", accuracy=False)
            for gamma in (float(g) for g in args.curve_gammas.split(",")):
                calibrated("expert_merging_pp", {"epochs": epochs(), "gamma": gamma}, f"em++ gamma={gamma}",
                           accuracy=False)
        elif section == "ceiling":
            folder, training = supervised_ceiling(bench, tuned_lambda(), args.ceiling_family)
            family = "" if args.ceiling_family == "tensor" else ", one α per LoRA component"
            record(f"supervised ceiling (α fit to labels{family})", [bench.evaluate(folder)], **training)
        else:
            parser.error(f"--sections: unknown section {section!r}")
    shutil.rmtree(args.out / "models", ignore_errors=True)
    print(f"wrote {results_path}")


def main_rows(bench: Bench, seeds: list[int], record, rows: dict) -> None:
    """The references and the tuned training-free methods; a row (or method) already in ROWS, from an earlier run
    that stopped, is kept, not measured again."""
    done = set(rows) | {row.get("method") for row in rows.values()}
    if "base" not in done:
        record("base", [bench.evaluate(bench.zoo / "base")])
    if "each expert on its own domain" not in done:
        own = [bench.evaluate(folder, domains=[folder.name]) for folder in bench.experts]
        record("each expert on its own domain", [EvalResult("experts", "eval", [r.domains[0] for r in own])])
    if not (bench.zoo / "mixture").is_dir():
        print(f"  {bench.zoo / 'mixture'}: not built (the zoo build stopped before it); no mixture row", flush=True)
    elif "mixture (multitask training)" not in done:
        record("mixture (multitask training)", [bench.evaluate(bench.zoo / "mixture")])
    if "average" not in done:
        record("average", [bench.evaluate(bench.merge("average", "average", {}))], method="average", params={})
    for method in ("task_arithmetic", "ties"):
        if method not in done:
            params, folder = bench.tune(method)
            record(label(method, params), [bench.evaluate(folder)], method=method, params=params)
    if "dare_ties" not in done:
        params, folder = bench.tune("dare_ties", seeds[0])
        dare = [bench.evaluate(folder if seed == seeds[0] else bench.merge(f"dare_ties-{seed}", "dare_ties", params,
                                                                           seed))
                for seed in seeds]
        record(label("dare_ties", params), dare, method="dare_ties", params=params)


def label(method: str, params: dict) -> str:
    return f"{method} ({', '.join(f'{key}={value}' for key, value in params.items())})"


def select_epochs(bench: Bench, init: float, curve: list[int], allowed: list[int], pull: dict) -> dict:
    """Expert Merging, seed 0 (γ from `pull`, else the spec's), trained to max(curve) epochs with a snapshot after
    each epoch of `curve`: each snapshot's calibration-split CE (the choice, among `allowed`), held-out CE (the
    curve) and mean alignment loss."""
    params = {"init": init, "epochs": max(curve), "keep_epochs": curve, **pull}
    folder, report = bench.merge_in_child("select", "expert_merging", params, 0)
    steps = report["stages"][-1]["steps"]
    points = {}
    for epoch in curve:
        snapshot = apply_coefficients(folder / "epochs" / f"coefficients-epoch-{epoch}.json",
                                      bench.out / "models" / f"epoch-{epoch}", overwrite=True)
        alignment = statistics.mean(s["loss"] for s in steps if s["epoch"] == epoch)
        points[epoch] = {**bench.score(snapshot), "alignment_loss": alignment}
        shutil.rmtree(snapshot)
        print(f"  expert_merging after {epoch} epochs: {json.dumps(points[epoch])}", flush=True)
    selected = min(allowed, key=lambda e: points[e]["calib_ce"])
    print(f"  -> {selected} epochs (lowest calibration-split CE among {allowed})", flush=True)
    return {"points": points, "selected": selected, "allowed": allowed, **pull,
            "calibration_seconds": report["seconds"], "steps_per_epoch": sum(1 for s in steps if s["epoch"] == 1)}


def select_gamma(bench: Bench, init: float, epochs: int, grid: list[float]) -> dict:
    """One Expert Merging run (seed 0) per γ of `grid`: its calibration-split CE (the choice) and held-out CE."""
    points = {}
    for gamma in grid:
        folder, report = bench.merge_in_child(f"gamma-{gamma}", "expert_merging",
                                              {"init": init, "epochs": epochs, "gamma": gamma}, 0)
        points[gamma] = {**bench.score(folder), "calibration_seconds": report["seconds"]}
        shutil.rmtree(folder)
        print(f"  expert_merging with γ={gamma}: {json.dumps(points[gamma])}", flush=True)
    selected = min(grid, key=lambda g: points[g]["calib_ce"])
    print(f"  -> γ={selected} (lowest calibration-split CE among {grid})", flush=True)
    return {"points": points, "selected": selected, "epochs": epochs}


def selected_epochs(rows: dict) -> int:
    """The select section's choice; without one, the released code's default of 1 epoch."""
    return rows["epoch selection"]["selected"] if "epoch selection" in rows else 1


def paired_rows(rows: dict, calibrated: list[str]) -> dict:
    """EM++ and EM against the best training-free row (lowest held-out macro CE, so the hardest reference),
    against AdaMerging, and against each other; their per-component (METHOD:rank) rows against the same and
    against their per-tensor rows. The calibrated methods' rows are those named in `calibrated` (the current
    epoch and γ choices)."""
    by_method = {row["method"] + (":rank" if row.get("params", {}).get("coefficients") == "rank" else ""): row
                 for name, row in rows.items() if "method" in row and "results" in row
                 and (row["method"] not in CALIBRATED or name in calibrated)}
    training_free = min((m for m in ("average", "task_arithmetic", "ties", "dare_ties") if m in by_method),
                        key=lambda m: by_method[m]["macro_ce"])
    pairs = [("expert_merging_pp", training_free), ("expert_merging", training_free),
             ("expert_merging_pp", "expert_merging"), ("expert_merging_pp", "adamerging"),
             ("expert_merging", "adamerging"), ("adamerging", training_free),
             *((f"{m}:rank", other) for m in RANK_FAMILY for other in (m, training_free))]
    differences = {}
    for ours, theirs in pairs:
        if ours in by_method and theirs in by_method:
            differences[f"{ours} − {theirs}"] = difference = paired_difference(by_method[ours], by_method[theirs])
            print(f"  {ours} − {theirs}: {difference['mean']:+.4f} nats/token, 95% interval "
                  f"[{difference['low']:+.4f}, {difference['high']:+.4f}], per seed {difference['per_seed']}",
                  flush=True)
    return differences


def supervised_ceiling(bench: Bench, init: float, family: str, epochs: int = 8) -> tuple[Path, dict]:
    """Not a merging method: one α per (tensor, expert) (FAMILY tensor) or per LoRA component (rank), fit to the
    labelled response CE of the calibration split's first --tune-examples examples per domain, by the calibration
    loop itself (8-sample steps, Adam at a constant lr 0.05, no pull, no clipping): what the same coefficients reach
    when labels are given. Not a bound: 8 labelled responses per domain carry less signal than the teachers'
    distributions over every token, and chunk-wise coefficients have more freedom.
    Returns the merged folder and the training's seconds and mean labelled CE per epoch."""
    import torch

    from merging.calibration import CalibrationParams, Coefficients, calibrated_tensors
    from merging.calibration.components import component_experts, per_component, pull_weights, ranks_of
    from merging.calibration.expert_merging import (
        MergedModel,
        Student,
        TrainableCoefficients,
        inverse_activation,
        train_stage,
    )
    from merging.calibration.params import DEFAULT_EXCLUDE
    from merging.calibration.samples import Sample
    from merging.calibration.sources import load_sources
    from merging.data.loading import IGNORE_INDEX, collate, encode, load_split
    from merging.experts import open_expert
    from merging.io.checkpoint import CheckpointReader
    from merging.io.hf_loading import load_causal_lm, load_tokenizer

    base = CheckpointReader(bench.zoo / "base")
    names = calibrated_tensors(base, set(base.names()), list(DEFAULT_EXCLUDE))
    network = load_causal_lm(bench.zoo / "base").eval().requires_grad_(False)
    layout = load_sources(base, [open_expert(p) for p in bench.experts], names, network, factored=True,
                          streamed=False, device=torch.device("cpu"), dtype=torch.float32)
    model = MergedModel(network, layout.sources, len(bench.experts))
    tokenizer = load_tokenizer(bench.zoo / "base")
    samples, labels = [], {}
    for index, domain in enumerate(bench.domains):
        for example in load_split(bench.zoo / "data", domain, "calib")[: bench.tune_examples]:
            batch = collate([encode(tokenizer, example, 192)], tokenizer.pad_token_id)
            samples.append(Sample(index, batch["input_ids"]))
            labels[id(samples[-1])] = batch["labels"][0, 1:]

    def losses(weights: dict[str, torch.Tensor], sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(weights, sample.input_ids, hidden=False).logits[0, :-1]
        ce = torch.nn.functional.cross_entropy(logits, labels[id(sample)], ignore_index=IGNORE_INDEX)
        return ce, torch.zeros(())

    student = Student(model.merged, losses)
    start = inverse_activation("sigmoid", init)
    experts = len(bench.experts)
    components = component_experts(layout.sources, experts) if family == "rank" else {}
    per_tensor = torch.full((experts, 1), start)
    coefficients = TrainableCoefficients(
        {n: per_component(per_tensor, components[n]) if n in components else per_tensor for n in names}, {},
        pull={n: pull_weights(of) for n, of in components.items()})  # γ is 0: it only counts components as one
    params = CalibrationParams(init=init, gamma=0.0, lr=0.05, weight_decay=0.0, epochs=epochs, grad_clip=None,
                               min_lr_ratio=1.0)
    report = train_stage("ceiling", coefficients, samples, student, [1.0] * len(bench.experts), params, seed=0)
    learned = Coefficients(bench.config("expert_merging", {}, 0), bench.domains,
                           {n: a.detach() for n, a in coefficients.alpha().items()},
                           ranks={n: ranks_of(of, experts) for n, of in components.items()})
    epoch_ce = [statistics.mean(s["loss"] for s in report.steps if s["epoch"] == e) for e in range(1, epochs + 1)]
    return (apply_coefficients(learned, bench.out / "models" / "ceiling", overwrite=True),
            {"calibration_seconds": report.seconds, "train_ce_per_epoch": epoch_ce})

if __name__ == "__main__":
    main()
