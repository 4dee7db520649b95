"""What every merging flow does once it has a merged model: evaluate it, put it in the store, refit the law on
every point measured so far, decide, log all of it to the flow's MLflow run, and register the model: alias `head`
(the merge the next expert joins) always, alias `champion` when it beats the current champion and the base (the
zeroth champion) by the pipeline's champion rule. Called from inside a flow."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from flows.pipeline_config import PipelineConfig
from flows.review import (
    Comparison,
    Crowning,
    crowning,
    decision_sentence,
    domain_table,
    lineage_tags,
    review_markdown,
)
from infra.registry import (
    CHAMPION,
    HEAD,
    MERGE_KEY,
    Lineage,
    champion_version,
    describe_version,
    expert_lineage,
    register_merged,
    set_alias,
)
from infra.settings import Settings
from merging.calibration.coefficients import CALIBRATION_FILE, COEFFICIENTS_PLOT
from merging.scaling_law.decision import DecisionRule
from tasks.caching import content_hash, fresh, tree_hash
from tasks.decide import Decision, LawJob, fit_and_decide
from tasks.evaluate import EvalJob, Scores, evaluate_merged
from tasks.fetch import LocalCheckpoint, merged_experts
from tasks.merge import MergedModel, MergeJob, Upload, upload_merged
from tasks.pipeline_state import MethodRuns, experiment_points, method_comparison
from tasks.stages import StageClock, StageCost
from tasks.tracking import (
    DECISION_TAG,
    EXPERTS_METRIC,
    MACRO_METRIC,
    MERGE_KEY_TAG,
    PREVIOUS_CHAMPION_TAG,
    REASON_TAG,
    RUN_NOTE_TAG,
    json_tag,
    log_run,
    read_run,
    run_link,
)


class Outcome(BaseModel):
    run_id: str
    merge_key: str
    model_path: Path  # the local merged model
    experts: list[str]
    macro_ce: float
    decision: Decision
    merged_uri: str
    version: str
    champion: bool
    verdict: str  # why it was crowned or not
    run_page: str  # the run in the MLflow UI
    incremental: bool
    stages: dict[str, StageCost]


def eval_job(model: MergedModel, data: LocalCheckpoint, config: PipelineConfig) -> EvalJob:
    settings = config.eval
    return EvalJob(model=model, data=data.path, data_sha256=data.ref.sha256, split=settings.split,
                   domains=settings.domains, max_examples=settings.max_examples, batch_size=settings.batch_size,
                   accuracy_samples=settings.accuracy_samples)


def job_params(job: MergeJob, data: LocalCheckpoint) -> dict[str, object]:
    """Run params: the method and its params, the seed, the data, the base and every expert with its sha256."""
    params: dict[str, object] = {"method": job.method, "params": json_tag(job.params), "seed": job.seed,
                                 "data": data.ref.uri, "data.sha256": data.ref.sha256,
                                 "base": job.base.ref.name, "base.sha256": job.base.ref.sha256,
                                 "experts": ",".join(e.ref.name for e in job.experts), "k": len(job.experts)}
    params |= {f"expert.{e.ref.name}.sha256": e.ref.sha256 for e in job.experts}
    params |= {f"params.{key}": value for key, value in job.params.items()}
    return params


def score_metrics(scores: Scores, k: int) -> dict[str, float]:
    metrics = {EXPERTS_METRIC: k, MACRO_METRIC: scores.macro_ce, "micro_ce": scores.micro_ce}
    metrics |= {f"ce.{domain}": ce for domain, ce in scores.ce.items()}
    metrics |= {f"accuracy.{domain}": accuracy for domain, accuracy in scores.accuracy.items()}
    if scores.accuracy:
        metrics["accuracy"] = sum(scores.accuracy.values()) / len(scores.accuracy)
    return metrics


def base_as_model(job: MergeJob) -> MergedModel:
    """The base, evaluated as a merge of no experts: the reference every merge is compared with."""
    return MergedModel(key=f"base-{job.base.ref.sha256}", path=job.base.path, state=None, experts=[])


def compare(scores: Scores, base_scores: Scores, champion: ModelVersion | None) -> Comparison:
    """The new merge's CE per domain against the base's and the current champion's (from its run's metrics; its
    macro CE from the version's tag when the run has none)."""
    champion_metrics = read_run(champion.run_id).metrics if champion is not None and champion.run_id else {}
    champion_macro = champion_metrics.get(MACRO_METRIC)
    if champion is not None and champion_macro is None:
        champion_macro = float(champion.tags.get(MACRO_METRIC, "inf"))
    return Comparison(ce=scores.ce, macro_ce=scores.macro_ce, base_ce=base_scores.ce,
                      base_macro_ce=base_scores.macro_ce,
                      champion_version=str(champion.version) if champion is not None else None,
                      champion_ce={d: champion_metrics[f"ce.{d}"] for d in scores.ce if f"ce.{d}" in champion_metrics},
                      champion_macro_ce=champion_macro)


def slug(name: str) -> str:
    """NAME as Prefect artifact keys allow: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "base"


def evaluate_with_base(job: MergeJob, merged: MergedModel, data: LocalCheckpoint, config: PipelineConfig
                       ) -> tuple[Scores, Scores]:
    """The merge's scores and the base's, on the same data."""
    scores = evaluate_merged(eval_job(merged, data, config))
    base_scores = evaluate_merged(eval_job(base_as_model(job), data, config))  # cached after the first run
    return scores, base_scores


def store_merged(merged: MergedModel, run_id: str, config: PipelineConfig, settings: Settings) -> str:
    """The merged model's S3 URI (the first upload's, when this merge was uploaded before)."""
    return upload_merged(Upload(model=merged, s3_uri=f"s3://{settings.bucket}/merged/{config.base.name}/{run_id}"))


def refit_and_decide(config: PipelineConfig, merge_key: str, k: int, macro_ce: float
                     ) -> tuple[dict[str, MethodRuns], Decision]:
    """Every point the experiment logged, by method, with this merge's added to its method's; and the decision of
    the law refitted on that method's points."""
    methods = experiment_points(config.experiment_name)
    mine = methods.setdefault(content_hash(config.method_identity()), MethodRuns(method=config.method))
    mine.points[merge_key] = (k, macro_ce)
    law = config.law
    points = sorted(mine.points.values())
    law_job = LawJob(method=config.method, points=points, experts=k, loss=macro_ce,
                     rule=DecisionRule(**law.model_dump(include=set(DecisionRule.model_fields))), epsilon=law.epsilon)
    return methods, fresh(fit_and_decide, law_job)(law_job)


def crown(config: PipelineConfig, comparison: Comparison, champion: ModelVersion | None, merge_key: str
          ) -> Crowning:
    """Whether this merge becomes the champion: it beats the base and the champion by the pipeline's rule (the
    champion's own merge, run again, stays what it is)."""
    return crowning(comparison, config.champion,
                    already_champion=champion is not None and champion.tags.get(MERGE_KEY) == merge_key)


def expert_lineages(job: MergeJob, settings: Settings) -> dict[str, Lineage]:
    """Each expert's registered version, found by its manifest's sha256 however the pipeline named it."""
    return {e.ref.name: expert_lineage(job.base.ref.name, e.ref.uri, e.ref.sha256, settings=settings)
            for e in job.experts}


def register_version(config: PipelineConfig, job: MergeJob, merged: MergedModel, uri: str, run_id: str,
                     macro_ce: float, champion: ModelVersion | None, crowned: bool, lineage: dict[str, Lineage],
                     settings: Settings) -> str:
    """The merge as a version of `merged.BASE` with its lineage, aliased `head`, and `champion` when CROWNED."""
    experts = [e.ref.model_copy(update={"version": lineage[e.ref.name].version}) for e in job.experts]
    version = register_merged(config.base.name, uri, run_id, merged.key, settings=settings, tags={
        MACRO_METRIC: f"{macro_ce:.6f}", "method": config.method,
        "experts": json_tag([ref.model_dump() for ref in experts]),
        PREVIOUS_CHAMPION_TAG: champion.version if champion is not None else "none",
        **lineage_tags(job, config.base.name, lineage)})
    set_alias(config.base.name, HEAD, version, settings=settings)
    if crowned:
        set_alias(config.base.name, CHAMPION, version, settings=settings)
    return version


def publish_review(page: str, config: PipelineConfig, job: MergeJob, comparison: Comparison, decision: Decision,
                   version: str, crowned: Crowning, lineage: dict[str, Lineage], settings: Settings) -> str:
    """The review (linking the run's PAGE), as the version's description and the flow run's markdown artifact."""
    review = review_markdown(config, job, comparison, decision, version, crowned, lineage, page,
                             {name: tree_hash(path) for name, path in job.calibration.items()})
    describe_version(config.base.name, version, review, settings=settings)
    create_markdown_artifact(review, key=f"merge-{slug(config.base.name)}",
                             description=decision_sentence(config, job, comparison, decision, version, crowned))
    return review


def run_metrics(scores: Scores, base_scores: Scores, comparison: Comparison, decision: Decision, k: int,
                stages: dict[str, StageCost], clock: StageClock) -> dict[str, float]:
    """The run's metrics: scores, the cost of each stage, the law and its prediction, and the gaps to the base and
    to the champion."""
    metrics = score_metrics(scores, k)
    metrics |= {f"stage.{stage}.seconds": seconds for stage, seconds in clock.seconds.items()}
    metrics |= {f"stage.{stage}.compute_seconds": cost.seconds for stage, cost in stages.items()}
    metrics |= {f"stage.{stage}.peak_rss_mb": cost.peak_rss_mb for stage, cost in stages.items()}
    metrics |= {f"law.{name}": value for name, value in (decision.law or {}).items()}
    metrics |= {"predicted_gain": decision.predicted_gain, "predicted_gain_low": decision.gain_low,
                "predicted_gain_high": decision.gain_high, "flow.seconds": clock.total}
    metrics |= {"base_macro_ce": base_scores.macro_ce, "vs_base.macro_ce": scores.macro_ce - base_scores.macro_ce}
    if comparison.champion_macro_ce is not None:
        metrics["vs_champion.macro_ce"] = scores.macro_ce - comparison.champion_macro_ce
    return metrics


def calibration_metrics(merged: MergedModel) -> dict[str, float]:
    """A calibrated merge's γ and ᾱ (as given or as `gamma: auto` and `init: auto` chose them), the held-out CE of
    each γ it tried and the calibration-sample CE of each ᾱ."""
    report_file = merged.path / CALIBRATION_FILE
    if not report_file.is_file():
        return {}
    report = json.loads(report_file.read_text())
    params = report["params"]
    metrics = {"calibration.gamma": float(params["gamma"]), "calibration.init": float(params["init"]),
               "calibration.seconds": report["seconds"]}
    gammas = (report.get("gamma_choice") or {}).get("held_out_ce", {})
    inits = (report.get("init_choice") or {}).get("ce", {})
    return (metrics | {f"calibration.held_out_ce.gamma_{gamma}": ce for gamma, ce in gammas.items()}
            | {f"calibration.ce.init_{init}": ce for init, ce in inits.items()})


def run_files(merged: MergedModel, decision: Decision) -> list[tuple[str, Path]]:
    """(artifact folder, file) of the run: the merge's config and plots, the law's plot. The model itself is not
    copied: its registered version is an MLflow model where the pipeline stored it."""
    files: list[tuple[str, Path]] = [("", merged.path / "merge_config.yaml")]
    files += [("coefficients", merged.path / name) for name in (COEFFICIENTS_PLOT, CALIBRATION_FILE)
              if (merged.path / name).is_file()]
    if decision.plot is not None:
        files.append(("law", decision.plot))
    return files


def conclude(run_id: str, job: MergeJob, merged: MergedModel, data: LocalCheckpoint, config: PipelineConfig,
             clock: StageClock, settings: Settings) -> Outcome:
    """Evaluate, upload, refit and decide, compare with the champion, register, review, and log it all to RUN_ID."""
    scores, base_scores = evaluate_with_base(job, merged, data, config)
    clock.lap("evaluate")
    uri = store_merged(merged, run_id, config, settings)
    clock.lap("upload")
    k = len(job.experts)
    methods, decision = refit_and_decide(config, merged.key, k, scores.macro_ce)
    clock.lap("fit")
    champion = champion_version(config.base.name, settings=settings)
    comparison = compare(scores, base_scores, champion)
    crowned = crown(config, comparison, champion, merged.key)
    lineage = expert_lineages(job, settings)
    version = register_version(config, job, merged, uri, run_id, scores.macro_ce, champion, crowned.crowned, lineage,
                               settings)
    page = run_link(run_id, read_run(run_id).experiment_id, settings)
    review = publish_review(page, config, job, comparison, decision, version, crowned, lineage, settings)
    clock.lap("register")
    stages = {"merge": merged.cost, "evaluate": scores.cost}
    metrics = run_metrics(scores, base_scores, comparison, decision, k, stages, clock) | calibration_metrics(merged)
    files = run_files(merged, decision)
    best = (k, scores.macro_ce) if crowned.crowned else None if champion is None else (
        len(merged_experts(champion)), comparison.champion_macro_ce)
    chart, methods_table = method_comparison(methods, best, merged.path.parent)
    files.append(("methods", chart))
    log_run(run_id, params=job_params(job, data), metrics=metrics,
            texts={"plan.md": decision.plan_markdown, "review.md": review}, files=files,
            tables={"per_domain.json": domain_table(comparison), "methods.json": methods_table},
            tags={DECISION_TAG: decision.action, REASON_TAG: decision.reason, MERGE_KEY_TAG: merged.key,
                  "mergeplan.incremental": str(merged.incremental).lower(), "mergeplan.merged_uri": uri,
                  "mergeplan.champion": str(crowned.crowned).lower(), "mergeplan.version": version,
                  PREVIOUS_CHAMPION_TAG: comparison.champion_version or "none",
                  RUN_NOTE_TAG: decision_sentence(config, job, comparison, decision, version, crowned)})
    return Outcome(run_id=run_id, merge_key=merged.key, model_path=merged.path, experts=merged.experts,
                   macro_ce=scores.macro_ce, decision=decision, merged_uri=uri, version=version,
                   champion=crowned.crowned, verdict=crowned.verdict, run_page=page,
                   incremental=merged.incremental, stages=stages)
