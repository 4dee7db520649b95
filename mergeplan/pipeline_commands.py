"""The pipeline's commands (up, down, status, expert upload/register/download/list, data upload, run, reconcile,
cache gc, serve, deploy): their handlers, which reach the services through infra/ and flows/, and their subparsers."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from infra.errors import StorageError
from merging.errors import ConfigError

if TYPE_CHECKING:
    from infra.manifest import Manifest

STACK_HELP = "settings from MERGEPLAN_* environment variables: see infra/README.md"


def environment_settings():
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

    _print_services(up(environment_settings(), args.services or None))


def _down(args: argparse.Namespace) -> None:
    from infra.stack import down

    states = down(environment_settings(), args.services or None)
    _print_services(states)
    if not states:
        print("nothing to stop: no pid files in the stack folder")


def _status(args: argparse.Namespace) -> None:
    from infra.stack import status

    _print_services(status(environment_settings()))


def _expert_upload(args: argparse.Namespace) -> None:
    from infra.s3 import upload_expert

    _print_upload(args.s3_uri, upload_expert(args.folder, args.s3_uri, settings=environment_settings()))


def _print_upload(uri: str, manifest: Manifest) -> None:
    print(f"{uri.rstrip('/')} ({len(manifest.files)} files, manifest sha256 {manifest.sha256})")


def _data_upload(args: argparse.Namespace) -> None:
    from infra.s3 import data_uri, upload_data

    settings = environment_settings()
    uri = args.s3_uri or data_uri(settings)
    _print_upload(uri, upload_data(args.folder, uri, settings=settings))


def _expert_register(args: argparse.Namespace) -> None:
    from infra.registry import register_expert

    expert = register_expert(args.s3_uri, args.domain, args.base, description=args.description,
                             settings=environment_settings())
    print(f"{expert.model_name} version {expert.version} ({expert.s3_uri}, sha256 {expert.sha256})")


def _expert_download(args: argparse.Namespace) -> None:
    from infra.s3 import download_folder

    print(download_folder(args.s3_uri, args.cache, settings=environment_settings()))


def _expert_list(args: argparse.Namespace) -> None:
    from infra.s3 import list_experts

    for uri in list_experts(args.base, settings=environment_settings()):
        print(uri)


def _run_pipeline(args: argparse.Namespace) -> None:
    from flows.merge_pipeline import merge_pipeline
    from flows.pipeline_config import load_pipeline_config
    from flows.runtime import configured, prefect_api
    from flows.scaling_sweep import scaling_sweep
    from infra.registry import check_reachable
    from infra.settings import redact_url

    settings = environment_settings()
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
    print(f"merged model {outcome.merged_uri}: merged.{config.base.name} version {outcome.version}, "
          f"{outcome.verdict}")
    print(f"MLflow run {outcome.run_id}: {outcome.run_page}")


def _reconcile(args: argparse.Namespace) -> None:
    from flows.pipeline_config import load_pipeline_config
    from flows.reconcile import reconcile
    from flows.runtime import configured, prefect_api
    from infra.registry import check_reachable
    from tasks.pipeline_state import untaken_experts

    settings = environment_settings()
    config = load_pipeline_config(args.config)
    check_reachable(settings.mlflow_tracking_uri, settings.mlflow_timeout_s)
    untaken = untaken_experts(config.experiment_name, config.base.name, settings)
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
    from infra.cache import collect_garbage, collect_work_garbage, work_folder

    for flag, value in (("--max-gb", args.max_gb), ("--work-max-gb", args.work_max_gb)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag}: the limit must be positive, got {value:g}")
    settings = environment_settings()
    limits = {"cache": settings.cache_max_gb if args.max_gb is None else args.max_gb,
              "work": settings.work_max_gb if args.work_max_gb is None else args.work_max_gb}
    report = collect_garbage(settings.cache_dir, int(limits["cache"] * 1e9))
    if report.busy:
        raise StorageError(f"{settings.cache_dir}: a download is in progress; run `mergeplan cache gc` again after it")
    work = work_folder(settings)
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

    settings = environment_settings()
    config = load_pipeline_config(args.config)
    with prefect_api(settings):
        serve_pipeline(config, settings, args.cron, reconcile_first=not args.no_reconcile)


def _deploy(args: argparse.Namespace) -> None:
    from flows.deployments import deploy_pipeline
    from flows.pipeline_config import load_pipeline_config
    from flows.reconcile import reconcile_through_pool
    from flows.runtime import prefect_api
    from infra.registry import check_reachable

    if args.unresponsive_after < 60:
        raise ConfigError(f"--unresponsive-after: at least 60 s (two of Prefect's shortest heartbeat intervals), "
                          f"got {args.unresponsive_after:g}")
    if args.retries < 0:
        raise ConfigError(f"--retries: a count, 0 or more, got {args.retries}")
    settings = environment_settings()
    config = load_pipeline_config(args.config)
    if not args.no_reconcile:
        check_reachable(settings.mlflow_tracking_uri, settings.mlflow_timeout_s)  # before anything is registered
    with prefect_api(settings):
        names = deploy_pipeline(config, settings, args.pool, args.cron, args.unresponsive_after, args.retries)
        for name in names:
            print(f"deployed {name} to work pool {args.pool}")
        run = None if args.no_reconcile else reconcile_through_pool(config, settings)
    if run is not None:
        print(f"registered experts no run has taken: flow run {run.name} of {names[0]} merges them, oldest first")
    print(f"start a worker (MERGEPLAN_* and the credentials in its environment): prefect worker start --pool "
          f"{args.pool}")


def add_pipeline_commands(commands: argparse._SubParsersAction) -> None:
    """Add the pipeline's commands to the top-level parser's COMMANDS."""
    stack_up = commands.add_parser(
        "up", help="start the local stack on 127.0.0.1: S3 (SeaweedFS, on disk), PostgreSQL (MERGEPLAN_DB=postgres), "
                   "MLflow, Prefect, webhook receiver",
        description="Starts each service not yet running, waits until healthy, creates the bucket and MLflow's "
                    "webhook; pids and logs in .mergeplan/stack/. Services given a remote URL are not started.",
        epilog=STACK_HELP)
    stack_up.add_argument("services", nargs="*", metavar="SERVICE",
                          help="s3, postgres, mlflow, prefect, webhook (default: every one whose URL is local; "
                               "postgres only with MERGEPLAN_DB=postgres)")
    stack_up.set_defaults(run=_up)
    stack_down = commands.add_parser("down", help="stop the local stack's processes (exactly those of `up`)",
                                     epilog=STACK_HELP)
    stack_down.add_argument("services", nargs="*", metavar="SERVICE",
                            help="s3, postgres, mlflow, prefect, webhook (default: all)")
    stack_down.set_defaults(run=_down)
    stack_status = commands.add_parser("status", help="each service: running, pid, healthy, address",
                                       epilog=STACK_HELP)
    stack_status.set_defaults(run=_status)

    run = commands.add_parser(
        "run", help="one pipeline run: download, merge, evaluate, fit, decide, log to MLflow, register",
        description="Runs the merge-pipeline flow on the stack of `mergeplan up` (or the servers the MERGEPLAN_* "
                    "URLs name).", epilog=STACK_HELP)
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
        epilog=STACK_HELP)
    gc.add_argument("--max-gb", type=float, help="the cache's limit for this run (default MERGEPLAN_CACHE_MAX_GB)")
    gc.add_argument("--work-max-gb", type=float,
                    help="the work folder's limit for this run (default MERGEPLAN_WORK_MAX_GB)")
    gc.set_defaults(run=_cache_gc)
    reconciling = commands.add_parser(
        "reconcile", help="run on-new-expert for each registered expert no run has taken (a lost trigger)",
        description="Finds the newest version of each registered expert of the pipeline's base that no on-new-expert "
                    "run finished with and the champion does not hold (its event was lost: Prefect or the receiver "
                    "was down), and runs on-new-expert for each, oldest registration first.", epilog=STACK_HELP)
    reconciling.add_argument("config", type=Path, help="pipeline YAML: the base, method and settings the flows use")
    reconciling.add_argument("--dry-run", action="store_true", help="list them, run nothing")
    reconciling.set_defaults(run=_reconcile)
    serve = commands.add_parser(
        "serve", help="serve the deployments: on-new-expert (event trigger) and the nightly scaling sweep (cron)",
        description="Runs until interrupted; needs the Prefect server of `mergeplan up` (or MERGEPLAN_PREFECT_API_URL) "
                    "for schedules and event triggers.", epilog=STACK_HELP)
    serve.add_argument("config", type=Path, help="pipeline YAML: the base, method and settings the flows use")
    serve.add_argument("--cron", default="0 2 * * *", help="schedule of the scaling sweep (default: nightly, 02:00)")
    serve.add_argument("--no-reconcile", action="store_true",
                       help="do not first merge the registered experts no run has taken (see `mergeplan reconcile`)")
    serve.set_defaults(run=_serve)
    deploy = commands.add_parser(
        "deploy", help="register the deployments of `serve` to a Prefect process work pool, for its workers to run",
        description="Registers on-new-expert (event trigger) and the nightly scaling sweep (cron) with the same "
                    "parameters and limits as `serve`, to a process work pool (created when missing), and the "
                    "automations that reschedule a run whose worker died. Each `prefect worker start --pool NAME` "
                    "(MERGEPLAN_* and the credentials in its environment) then runs them. See "
                    "docs/production-workers.md.", epilog=STACK_HELP)
    deploy.add_argument("config", type=Path, help="pipeline YAML: the base, method and settings the flows use")
    deploy.add_argument("--pool", default="mergeplan", help="the process work pool (default: mergeplan)")
    deploy.add_argument("--cron", default="0 2 * * *", help="schedule of the scaling sweep (default: nightly, 02:00)")
    deploy.add_argument("--unresponsive-after", type=float, default=600, metavar="SECONDS",
                        help="a run without a heartbeat this long is marked Crashed (default 600; the flow-run "
                             "processes' PREFECT_FLOWS_HEARTBEAT_FREQUENCY must be well below it)")
    deploy.add_argument("--retries", type=int, default=2,
                        help="how many times a crashed run is rescheduled for any worker (default 2)")
    deploy.add_argument("--no-reconcile", action="store_true",
                        help="do not start a run for the registered experts no run has taken (see `reconcile`)")
    deploy.set_defaults(run=_deploy)

    expert = commands.add_parser("expert", help="the S3 expert store and the MLflow registry")
    expert_commands = expert.add_subparsers(dest="expert_command", required=True, metavar="EXPERT_COMMAND")
    upload = expert_commands.add_parser(
        "upload", help="upload a checkpoint folder and its manifest (sha256 per file)", epilog=STACK_HELP,
        description="Layout: s3://BUCKET/experts/BASE/NAME for experts, s3://BUCKET/bases/BASE for a base.")
    upload.add_argument("folder", type=Path, help="Hugging Face checkpoint folder (safetensors; pickles refused)")
    upload.add_argument("s3_uri", metavar="S3_URI", help="e.g. s3://mergeplan/experts/tiny-base/algebra")
    upload.set_defaults(run=_expert_upload)
    register = expert_commands.add_parser(
        "register", help="register an uploaded expert as a new version of the MLflow model expert.BASE.DOMAIN",
        description="Refused when its config.json differs structurally from the base's (s3://BUCKET/bases/BASE). "
                    "MLflow's webhook then emits the Prefect event mergeplan.expert.registered.", epilog=STACK_HELP)
    register.add_argument("s3_uri", metavar="S3_URI", help="the expert's folder in the store")
    register.add_argument("--domain", required=True, help="the expert's domain, e.g. algebra")
    register.add_argument("--base", required=True, help="the pipeline's base, e.g. tiny-base")
    register.add_argument("--description", help="version description")
    register.set_defaults(run=_expert_register)
    download = expert_commands.add_parser(
        "download", help="download (or find in the cache) a verified local copy; prints its folder",
        epilog=STACK_HELP)
    download.add_argument("s3_uri", metavar="S3_URI")
    download.add_argument("--cache", type=Path, help="cache folder (default .mergeplan/cache)")
    download.set_defaults(run=_expert_download)
    listing = expert_commands.add_parser("list", help="the experts of a base in the store", epilog=STACK_HELP)
    listing.add_argument("--base", required=True)
    listing.set_defaults(run=_expert_list)

    data = commands.add_parser("data", help="evaluation and calibration data in the S3 store")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    data_upload = data_commands.add_parser(
        "upload", help="upload a data folder (DOMAIN/{eval,calib}.jsonl) and its manifest", epilog=STACK_HELP,
        description="A pipeline YAML then names it as data: s3://BUCKET/data; runs download it once, verified.")
    data_upload.add_argument("folder", type=Path, help="data folder with one subfolder per domain")
    data_upload.add_argument("s3_uri", metavar="S3_URI", nargs="?", help="default: s3://BUCKET/data")
    data_upload.set_defaults(run=_data_upload)
