"""Benchmark: MLflow and Prefect on PostgreSQL against sqlite (MERGEPLAN_DB), per pipeline run.

Two local stacks side by side on free loopback ports, one per backend (moto S3, MLflow, Prefect; the postgres one
with its local cluster), the tiny zoo's base and three experts stored and registered in each, and a worker process
per stack (Prefect's clients in one process serve one API: its events worker stays with the first). Then, in turns
(sqlite, postgres, sqlite, ... so that a load that changes meanwhile falls on both alike), each timed in its worker:
- pipeline: a merge-pipeline run in this process whose fetch, merge, evaluation and fit come from the cache (after
  one warm-up run), so what is left is the run's own round trips: Prefect's flow and task runs and their states,
  the MLflow run with its params, metrics, tags and artifacts, the registry lookups;
- mlflow: one tracking run logged as the pipeline logs one (create, 20 params, 10 metrics, 5 tags, terminate), then
  a model-version search;
- prefect: a flow of 5 trivial tasks.
Medians of --repeats. A benchmark, not a test: nothing is asserted. Results go to WORKDIR/postgres.md.

    .venv/bin/python bench/postgres.py                 # 5 repeats
    .venv/bin/python bench/postgres.py --repeats 2     # a quick run
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from datetime import date
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("sqlite", "postgres")
DOMAINS = ["algebra", "analysis", "biology"]
BASE = "bench-base"


def backend_settings(root: Path, backend: str):
    from infra.settings import S3_INTERNAL_PORTS, Settings
    from infra.stack import free_port_block

    return Settings(state_dir=root / backend, db=backend, s3_server="moto",
                    s3_port=free_port_block(S3_INTERNAL_PORTS + 1), postgres_port=free_port_block(1),
                    mlflow_port=free_port_block(1), prefect_port=free_port_block(1),
                    webhook_port=free_port_block(1), startup_timeout_s=600)


def services(settings) -> list[str]:
    return ["s3", *(["postgres"] if settings.db == "postgres" else []), "mlflow", "prefect"]


def store(zoo: Path, settings) -> None:
    from infra.registry import register_expert
    from infra.s3 import base_uri, expert_uri, upload_expert

    upload_expert(zoo / "base", base_uri(BASE, settings), settings=settings)
    for domain in DOMAINS:
        uri = expert_uri(BASE, domain, settings)
        upload_expert(zoo / "experts" / domain, uri, settings=settings)
        register_expert(uri, domain, BASE, settings=settings)


def probes(zoo: Path) -> dict[str, Callable[[object], None]]:
    """What is timed, each a call on one stack's settings."""
    from mlflow import MlflowClient
    from prefect import flow, task

    from flows.merge_pipeline import merge_pipeline
    from flows.pipeline_config import PipelineConfig
    from flows.runtime import configured

    config = PipelineConfig.model_validate({
        "base": {"name": BASE}, "method": "task_arithmetic", "params": {"lambda": 0.2}, "data": zoo / "data",
        "eval": {"max_examples": 4, "batch_size": 8}})

    def pipeline(settings) -> None:
        configured(merge_pipeline, config.runner, settings)(config)

    def mlflow_run(settings) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = MlflowClient(settings.mlflow_tracking_uri)
        experiment = client.get_experiment_by_name("bench-postgres") or client.get_experiment(
            client.create_experiment("bench-postgres"))
        run = client.create_run(experiment.experiment_id)
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, params=[Param(f"p{i}", str(i)) for i in range(20)],
                         metrics=[Metric(f"m{i}", float(i), now, 0) for i in range(10)],
                         tags=[RunTag(f"t{i}", str(i)) for i in range(5)])
        client.set_terminated(run.info.run_id)
        client.search_model_versions(f"name = 'expert.{BASE}.algebra'")

    @task
    def step(value: int) -> int:
        return value + 1

    @flow(name="bench-postgres-round-trips")
    def five_tasks() -> int:
        return sum(step(i) for i in range(5))

    return {"pipeline": pipeline, "mlflow": mlflow_run, "prefect": lambda settings: five_tasks()}


def worker(environment: dict[str, str], zoo: Path, commands: Connection) -> None:
    """In a process of its own, on one stack: store the zoo, warm every probe up (the caches, Prefect's first flow,
    MLflow's first run), then run the probe each command names and answer its seconds, until None."""
    from prefect.logging.handlers import APILogHandler

    from flows.runtime import prefect_api
    from infra.settings import Settings

    os.environ.update(environment)  # the tasks read their settings from the environment, as in a Prefect worker
    settings = Settings.from_env()
    timed = probes(zoo)
    with prefect_api(settings):
        store(zoo, settings)
        for probe in timed.values():
            probe(settings)
        commands.send("ready")
        while (name := commands.recv()) is not None:
            started = time.perf_counter()
            timed[name](settings)
            commands.send(time.perf_counter() - started)
            APILogHandler().flush()  # not timed: the run's log lines, sent in the background
    commands.send("done")


def measure(zoo: Path, repeats: int, root: Path) -> dict[str, dict[str, list[float]]]:
    from infra import stack

    stacks = {backend: backend_settings(root, backend) for backend in BACKENDS}
    names = ("pipeline", "mlflow", "prefect")
    seconds: dict[str, dict[str, list[float]]] = {name: {backend: [] for backend in BACKENDS} for name in names}
    spawn = multiprocessing.get_context("spawn")
    workers: dict[str, tuple[multiprocessing.Process, Connection]] = {}
    try:
        for backend, settings in stacks.items():
            stack.up(settings, services(settings))
            ours, theirs = spawn.Pipe()
            workers[backend] = (spawn.Process(target=worker, args=(settings.as_env(), zoo, theirs)), ours)
            workers[backend][0].start()
        for _, commands in workers.values():
            assert commands.recv() == "ready"
        for _ in range(repeats):
            for name in names:
                for backend, (_, commands) in workers.items():
                    commands.send(name)
                    seconds[name][backend].append(commands.recv())
        for process, commands in workers.values():
            commands.send(None)
            commands.recv()
            process.join(60)
    finally:
        for process, _ in workers.values():
            if process.is_alive():
                process.kill()
        for settings in stacks.values():
            stack.down(settings, services(settings))
    return seconds


def report(seconds: dict[str, dict[str, list[float]]], repeats: int) -> str:
    rows = ["| what | sqlite: median (min-max), s | postgres: median (min-max), s | postgres / sqlite |",
            "|---|---|---|---|"]
    for name, by_backend in seconds.items():
        lite, pg = (statistics.median(by_backend[backend]) for backend in BACKENDS)
        spread = {backend: f"{min(by_backend[backend]):.3f}-{max(by_backend[backend]):.3f}" for backend in BACKENDS}
        rows.append(f"| {name} | {lite:.3f} ({spread['sqlite']}) | {pg:.3f} ({spread['postgres']}) | {pg / lite:.2f} |")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"# MLflow and Prefect on PostgreSQL against sqlite ({date.today()}, `bench/postgres.py --repeats "
            f"{repeats}`)\n\nMedians of {repeats}, in turns; {os.cpu_count()} CPU cores, load average at the end "
            f"{load} (other jobs were running: compare the two columns, not these figures with other tables).\n\n"
            + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench" / "out" / "postgres")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    zoo = args.workdir / "zoo"
    if not (zoo / "base").is_dir():
        from merging.zoo.build import build_zoo

        build_zoo("tiny", zoo)
    from infra.postgres import enterable_temp_folder

    with enterable_temp_folder("mergeplan-bench-postgres-") as root:
        text = report(measure(zoo, args.repeats, root), args.repeats)
    (args.workdir / "postgres.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
