"""What the pipeline has done so far, read from MLflow: the expert versions runs have taken, and the (experts,
macro CE) points runs have logged, by method. The head and the champion are the registry's aliases
(infra.registry.head_version and champion_version)."""

from __future__ import annotations

from pathlib import Path

from mlflow.exceptions import MlflowException
from prefect import task
from pydantic import BaseModel

from infra.registry import RegisteredExpert, head_version, latest_expert_versions, mlflow_client, refused
from infra.settings import Settings
from merging.scaling_law.plots import plot_methods
from tasks.fetch import merged_experts
from tasks.retrying import IO_TASK_OPTIONS
from tasks.tracking import (
    DECISION_TAG,
    EXPERTS_METRIC,
    MACRO_METRIC,
    MERGE_KEY_TAG,
    METHOD_TAG,
    NEW_EXPERT_SHA_TAG,
    NEW_EXPERT_TAG,
    PARAMS_KEY_TAG,
)


def _runs(experiment: str, filter_string: str, max_results: int, settings: Settings) -> list:
    """EXPERIMENT's runs that match FILTER_STRING; none before the experiment exists."""
    client = mlflow_client(settings)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    try:
        return client.search_runs([found.experiment_id], filter_string=filter_string, max_results=max_results)
    except MlflowException as exc:
        raise refused(exc, f"searching runs of {experiment}", settings) from exc


def taken_experts(experiment: str, base: str, settings: Settings) -> set[tuple[str, str]]:
    """(S3 folder, manifest sha256) of the expert versions taken: an on-new-expert run of EXPERIMENT finished with
    it, or refused it (another base: running it again would refuse it again), or BASE's head holds it."""
    runs = _runs(experiment, f"tags.`{NEW_EXPERT_SHA_TAG}` LIKE '%'", 50000, settings)
    taken = {(run.data.tags[NEW_EXPERT_TAG], run.data.tags[NEW_EXPERT_SHA_TAG]) for run in runs
             if run.info.status == "FINISHED" or run.data.tags.get(DECISION_TAG) == "refused"}
    head = head_version(base, settings=settings)
    return taken | {(ref.uri, ref.sha256) for ref in merged_experts(head)} if head is not None else taken


def untaken_experts(experiment: str, base: str, settings: Settings,
                    taken: set[tuple[str, str]] | None = None) -> list[RegisteredExpert]:
    """The newest version of each registered expert of BASE that no run took (TAKEN, when already read), oldest
    first."""
    taken = taken_experts(experiment, base, settings) if taken is None else taken
    return [expert for expert, _ in latest_expert_versions(base, settings=settings)
            if (expert.s3_uri, expert.sha256) not in taken]


class MethodRuns(BaseModel):
    """The merged models an experiment's finished runs measured with one method identity (method, params, seed):
    (experts, macro CE) by merge key, nested runs included."""

    method: str
    points: dict[str, tuple[int, float]] = {}


@task(name="read-experiment-points", **IO_TASK_OPTIONS)
def experiment_points(experiment: str) -> dict[str, MethodRuns]:
    """Every finished run's point in EXPERIMENT, by params key (tag mergeplan.params_key).

    One point per merged model: a cached re-run logs the same model again, and must not weigh twice."""
    runs = _runs(experiment, f"tags.`{PARAMS_KEY_TAG}` LIKE '%' and attributes.status = 'FINISHED'", 5000,
                 Settings.from_env())
    methods: dict[str, MethodRuns] = {}
    for run in runs:
        metrics, tags = run.data.metrics, run.data.tags
        if EXPERTS_METRIC in metrics and MACRO_METRIC in metrics:
            entry = methods.setdefault(tags[PARAMS_KEY_TAG], MethodRuns(method=tags.get(METHOD_TAG, "")))
            entry.method = entry.method or tags.get(METHOD_TAG, "")  # nested runs may not carry the method
            entry.points[tags.get(MERGE_KEY_TAG, run.info.run_id)] = (int(metrics[EXPERTS_METRIC]),
                                                                      float(metrics[MACRO_METRIC]))
    return methods


def method_curves(methods: dict[str, MethodRuns]) -> dict[str, list[tuple[int, float]]]:
    """(k, macro CE) points by label: the method's name, with its params key when two identities share it."""
    names = [entry.method or "unnamed" for entry in methods.values()]
    return {(name if names.count(name) == 1 else f"{name} #{key[:6]}"): sorted(entry.points.values())
            for (key, entry), name in zip(methods.items(), names, strict=True)}


def method_comparison(methods: dict[str, MethodRuns], champion: tuple[int, float] | None,
                      folder: Path) -> tuple[Path, dict[str, list]]:
    """The experiment's methods side by side: FOLDER/methods.png (loss vs k per method, the champion starred) and
    the columns of the table methods.json (method, k, macro_ce), which MLflow's UI compares across runs."""
    curves = method_curves(methods)
    rows = [(label, k, loss) for label, points in curves.items() for k, loss in points]
    chart = plot_methods(curves, folder / "methods.png", champion=champion)
    return chart, {"method": [r[0] for r in rows], "k": [r[1] for r in rows], "macro_ce": [r[2] for r in rows]}
