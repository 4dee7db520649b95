"""The one command line: parses arguments, then calls the library. Errors are one line, exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version
from pathlib import Path

from pydantic import ValidationError

from merging.config import describe_validation_error
from merging.errors import ConfigError, MergeplanError

MERGE_EXAMPLE = """\
merge.yaml:
  base: path/to/base                 # HF folder: config.json + model.safetensors (or shards + index)
  experts: [path/to/e1, path/to/e2, {path: path/to/e3, weight: 0.5}]
  method: ties                       # average | task_arithmetic | ties | dare_linear | dare_ties
                                     # | expert_merging | expert_merging_pp (calibrated, see below)
  params: {density: 0.2, lambda: 1.0}
  dtype: bfloat16                    # optional output dtype; default: the base's
  seed: 0                            # DARE's randomness
  include: ["*"]                     # tensor-name patterns to merge; the rest is copied from the base
  max_shard_size: 5GB
  out: merged/                       # optional; OUT on the command line wins
Relative paths are taken from the YAML file's folder.

expert_merging / expert_merging_pp learn coefficients on unlabeled samples, one set per expert name
(an expert's name is its folder name, or name: in {path: ..., name: ...}); weight: is its task weight:
  calibration: {algebra: data/algebra/calib.jsonl, code: data/code/}
  params: {samples_per_expert: 8, init: 0.3, gamma: 0.8, temperature: 1.0, hidden_layers: [middle],
           lr: 0.5, epochs: 1, budget: 1.0, kappa: 1.0, device: auto, seed: 0}
The output folder also gets coefficients.json, coefficients.png and calibration.json."""


def _merge(args: argparse.Namespace) -> None:
    from merging import merge

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
    from merging.zoo import build_zoo

    print(build_zoo(args.preset, args.out, args.domains, args.data))


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
    result = evaluate(args.target, args.data, args.domains, **options)
    for score in result.domains:
        accuracy = "" if score.accuracy is None else f"  exact match {score.accuracy:.3f} (n={score.accuracy_examples})"
        print(f"{score.domain:<16} CE {score.ce:.4f} nats over {score.tokens} tokens{accuracy}")
    print(f"{'macro':<16} CE {result.macro_ce:.4f}\n{'micro':<16} CE {result.micro_ce:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")


def _demo(args: argparse.Namespace) -> None:
    from mergeplan.demo import run_demo

    run_demo(args.workdir)


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
                                                "sizes: three base sizes x 9 experts (the N axis of the law).")
    build.add_argument("--preset", default="tiny", help="tiny | small | sizes (default tiny)")
    build.add_argument("--out", type=Path, required=True, help="zoo folder; models already built are reused")
    build.add_argument("--domains", type=lambda s: s.split(","),
                       help="comma-separated domains instead of the nine synthetic ones: synthetic (algebra, ...), "
                            "real text (python_stdlib, c_headers, man_pages, licenses) or folders of --data")
    build.add_argument("--data", type=Path, help="your own data: DATA/DOMAIN/ folders of .txt/.jsonl files")
    build.set_defaults(run=_zoo_build)

    evaluate = commands.add_parser(
        "evaluate", help="held-out cross-entropy per domain (and exact-match accuracy)",
        description="Token-weighted CE in nats on response tokens (prompts masked), per domain, macro, micro.")
    evaluate.add_argument("target", type=Path, help="model folder, or a zoo folder with --matrix")
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

    demo = commands.add_parser("demo", help="build the tiny zoo, merge it with every method, evaluate, print a table")
    demo.add_argument("--workdir", type=Path, default=Path(".mergeplan/demo"), help="where models are written")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
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
