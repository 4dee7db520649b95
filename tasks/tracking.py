"""MLflow tracking for the flows: one run per pipeline execution (nested runs for the merges of a sweep or of
the law's prefix points), params, metrics, artifacts and decision tags.

Nothing logged may carry a credential: every param, tag and text artifact passes `scrub`, which removes the
values of the configured secrets and the user:password of URLs.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME, MLFLOW_RUN_NOTE
from prefect import task
from pydantic import BaseModel

from infra.registry import mlflow_client, refused
from infra.settings import AWS_ENV, Settings, without_userinfo
from tasks.retrying import IO_TASK_OPTIONS

# MLflow prints the run's URL, tracking server included (user:password@ too), when a run ends: never to our output.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

FLOW_TAG, METHOD_TAG, DECISION_TAG, REASON_TAG = ("mergeplan.flow", "mergeplan.method", "mergeplan.decision",
                                                  "mergeplan.reason")
BASE_TAG, MERGE_KEY_TAG = "mergeplan.base", "mergeplan.merge_key"
# of an on-new-expert run: the expert version it took (its S3 folder and the sha256 of its manifest)
NEW_EXPERT_TAG, NEW_EXPERT_SHA_TAG = "mergeplan.new_expert", "mergeplan.new_expert_sha256"
# Hash of (method, params, seed): the law is fitted on points that differ only in their experts.
PARAMS_KEY_TAG = "mergeplan.params_key"
# the champion a run's merge was compared with (its version, or "none"); with the run's version, its history
PREVIOUS_CHAMPION_TAG = "mergeplan.previous_champion"
RUN_NOTE_TAG = MLFLOW_RUN_NOTE  # the run's description in the MLflow UI
EXPERTS_METRIC, MACRO_METRIC = "experts", "macro_ce"
# The experiment tag that marks a model-training experiment ("Model training", not GenAI). MLflow 3.17's UI picks
# the kind from its GenAI/Model-training switch instead, so links also carry `workflowType=machine_learning`.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# A view of the run list the UI shares by key (an experiment tag): the columns a reviewer sorts by, best first.
REVIEW_VIEW = "mergeplan"
REVIEW_VIEW_TAG = f"mlflow.sharedViewState.{REVIEW_VIEW}"
REVIEW_COLUMNS = ["metrics.`macro_ce`", "metrics.`experts`", "metrics.`vs_base.macro_ce`", "tags.`mergeplan.method`",
                  "tags.`mergeplan.decision`", "tags.`mergeplan.champion`", "tags.`mergeplan.version`"]
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_TEXT_SUFFIXES = {".md", ".txt", ".yaml", ".yml", ".json", ".csv"}
_BATCH = 100  # MLflow's limit of params per log_batch call


def secret_values(settings: Settings) -> list[str]:
    """Every credential this process knows: they must never reach MLflow."""
    fields = [*AWS_ENV, "webhook_secret"]
    values = [getattr(settings, field) for field in fields]
    return [value.get_secret_value() for value in values if value is not None and value.get_secret_value()]


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return _URL_USERINFO.sub("***@", text)


def _experiment_id(client, name: str) -> str:
    """NAME's id, created as a model-training experiment with the reviewer's view of its runs; one made before
    without them gets them."""
    view = json.dumps({"orderByKey": "metrics.`macro_ce`", "orderByAsc": True, "selectedColumns": REVIEW_COLUMNS})
    tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING, REVIEW_VIEW_TAG: view}
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        for key, value in tags.items():
            if experiment.tags.get(key) != value:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, tags=tags)
    except MlflowException as exc:  # created meanwhile by a concurrent run
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


@task(name="open-mlflow-run", **IO_TASK_OPTIONS)
def open_run(experiment: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    """A new run (nested under PARENT_RUN_ID when given); returns its id."""
    settings = Settings.from_env()
    client = mlflow_client(settings)
    secrets = secret_values(settings)
    tags = {key: scrub(str(value), secrets) for key, value in tags.items()} | {MLFLOW_RUN_NAME: run_name}
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    try:
        return client.create_run(_experiment_id(client, experiment), run_name=run_name, tags=tags).info.run_id
    except MlflowException as exc:
        raise refused(exc, f"a run in experiment {experiment}", settings) from exc


@task(name="log-to-mlflow", **IO_TASK_OPTIONS)
def log_run(run_id: str, params: dict[str, object] | None = None, metrics: dict[str, float] | None = None,
            tags: dict[str, str] | None = None, texts: dict[str, str] | None = None,
            files: list[tuple[str, Path]] | None = None, tables: dict[str, dict[str, list]] | None = None) -> None:
    """Params, finite metrics, tags, text artifacts (name -> content), files ((artifact folder, file) pairs) and
    tables (artifact file -> columns; MLflow's table artifacts, which its UI compares across runs)."""
    settings = Settings.from_env()
    client = mlflow_client(settings)
    secrets = secret_values(settings)
    params = [Param(key, scrub(str(value), secrets)[:6000]) for key, value in (params or {}).items()]
    metrics = [Metric(key, float(value), 0, 0) for key, value in (metrics or {}).items()
               if value is not None and math.isfinite(value)]
    tags = [RunTag(key, scrub(str(value), secrets)) for key, value in (tags or {}).items()]
    try:
        for start in range(0, max(len(params), len(metrics), len(tags)), _BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + _BATCH], params=params[start:start + _BATCH],
                             tags=tags[start:start + _BATCH])
        for name, content in (texts or {}).items():
            client.log_text(run_id, scrub(content, secrets), name)
        for folder, path in files or []:
            _log_file(client, run_id, Path(path), folder, secrets)
        for name, columns in (tables or {}).items():
            client.log_table(run_id, data=columns, artifact_file=name)
    except MlflowException as exc:
        raise refused(exc, f"logging to run {run_id}", settings) from exc


def _log_file(client, run_id: str, path: Path, folder: str, secrets: list[str]) -> None:
    if path.suffix not in _TEXT_SUFFIXES:
        client.log_artifact(run_id, str(path), folder or None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / path.name
        clean.write_text(scrub(path.read_text(), secrets))
        client.log_artifact(run_id, str(clean), folder or None)


@task(name="close-mlflow-run", **IO_TASK_OPTIONS)
def close_run(run_id: str, status: str = "FINISHED") -> None:
    settings = Settings.from_env()
    try:
        mlflow_client(settings).set_terminated(run_id, status)
    except MlflowException as exc:
        raise refused(exc, f"ending run {run_id}", settings) from exc


class RunFacts(BaseModel):
    experiment_id: str
    metrics: dict[str, float]  # the latest value of each


@task(name="read-run", **IO_TASK_OPTIONS)
def read_run(run_id: str) -> RunFacts:
    settings = Settings.from_env()
    try:
        run = mlflow_client(settings).get_run(run_id)
    except MlflowException as exc:
        raise refused(exc, f"reading run {run_id}", settings) from exc
    return RunFacts(experiment_id=run.info.experiment_id, metrics=dict(run.data.metrics))


def _ui(settings: Settings) -> str:
    """The MLflow UI's address, without credentials."""
    return without_userinfo(settings.mlflow_tracking_uri).rstrip("/")


def run_link(run_id: str, experiment_id: str, settings: Settings) -> str:
    """The run's page in the MLflow UI, in its model-training view."""
    return f"{_ui(settings)}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def experiment_link(experiment_id: str, settings: Settings) -> str:
    """The experiment's run list in the MLflow UI, in the reviewer's view (macro CE first, best on top)."""
    return (f"{_ui(settings)}/#/experiments/{experiment_id}/runs?viewStateShareKey={REVIEW_VIEW}"
            "&workflowType=machine_learning")


def json_tag(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class NestedRun(BaseModel):
    """A finished child run: one merge of a sweep, or one of the law's prefix points."""

    name: str
    params: dict[str, object]
    metrics: dict[str, float]
    tags: dict[str, str] = {}


@task(name="log-nested-runs", **IO_TASK_OPTIONS)
def log_nested_runs(parent_run_id: str, experiment: str, tags: dict[str, str], runs: list[NestedRun]) -> int:
    """One finished child run of PARENT_RUN_ID per entry of RUNS, each with TAGS besides its own."""
    for run in runs:
        run_id = open_run.fn(experiment, run.name, tags, parent_run_id=parent_run_id)
        log_run.fn(run_id, params=run.params, metrics=run.metrics, tags=run.tags)
        close_run.fn(run_id)
    return len(runs)


@contextmanager
def tracked_run(experiment: str, run_name: str, tags: dict[str, str]) -> Iterator[str]:
    """A new MLflow run for the block: FINISHED when the block ends, FAILED when it raises (the error goes on)."""
    run_id = open_run(experiment, run_name, tags)
    try:
        yield run_id
    except BaseException:
        close_run(run_id, "FAILED")
        raise
    close_run(run_id)
