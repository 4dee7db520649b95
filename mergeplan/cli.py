"""The one command line: parses arguments, then calls the library. Errors are one line, exit status 2.

The commands live in library_commands.py (merging/ alone) and pipeline_commands.py (the services and flows)."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version

from pydantic import ValidationError

from mergeplan.library_commands import add_library_commands
from mergeplan.pipeline_commands import add_pipeline_commands
from merging.config import describe_validation_error
from merging.errors import MergeplanError

# The `pipeline` extra's packages: a command that needs one of them says how to install it, in one line.
PIPELINE_PACKAGES = frozenset({"prefect", "prefect_dask", "mlflow", "boto3", "botocore", "moto", "dask", "distributed",
                               "psutil"})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergeplan", description="Merge fine-tuned LLM experts.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('mergeplan')}")
    parser.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_library_commands(commands)
    add_pipeline_commands(commands)
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
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in PIPELINE_PACKAGES:
            raise
        print(f"error: mergeplan {args.command} needs the pipeline extra ({exc.name} is not installed): "
              "pip install 'mergeplan[pipeline]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
