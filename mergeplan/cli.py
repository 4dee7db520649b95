"""The one command line: parses arguments, then calls the library. Errors are one line, exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version
from pathlib import Path

from merging.errors import MergeplanError

MERGE_EXAMPLE = """\
merge.yaml:
  base: path/to/base                 # HF folder: config.json + model.safetensors (or shards + index)
  experts: [path/to/e1, path/to/e2, {path: path/to/e3, weight: 0.5}]
  method: ties                       # average | task_arithmetic | ties | dare_linear | dare_ties
  params: {density: 0.2, lambda: 1.0}
  dtype: bfloat16                    # optional output dtype; default: the base's
  seed: 0                            # DARE's randomness
  include: ["*"]                     # tensor-name patterns to merge; the rest is copied from the base
  max_shard_size: 5GB
Relative paths are taken from the YAML file's folder."""


def _merge(args: argparse.Namespace) -> None:
    from merging import merge

    out = merge(args.config, args.out, overwrite=args.overwrite, save_state=args.save_state)
    print(out)


def _add_expert(args: argparse.Namespace) -> None:
    from merging import ExpertRef, add_experts

    experts = [ExpertRef(path=path, weight=args.weight) for path in args.experts]
    print(add_experts(args.state, experts, args.out, overwrite=args.overwrite))


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
    merge.add_argument("out", type=Path, help="output checkpoint folder (written atomically)")
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

    demo = commands.add_parser("demo", help="build tiny models, merge them with every method, print a table")
    demo.add_argument("--workdir", type=Path, default=Path(".mergeplan/demo"), help="where models are written")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        args.run(args)
    except MergeplanError as exc:
        print(f"error: {exc}", file=sys.stderr)
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
