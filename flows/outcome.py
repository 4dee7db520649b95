"""What every merging flow does once it has a merged model: evaluate it, put it in the store, refit the law on
every point measured so far, decide, log all of it to the flow's MLflow run, and register the model: alias `head`
(the merge the next expert joins) always, alias `champion` when its macro CE beats the current champion's.
Called from inside a flow."""

from __future__ import annotations

import re
import time
from pathlib import Path, PurePosixPath

from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from flows.pipeline_config import PipelineConfig
from flows.review import Comparison, decision_sentence, domain_table, lineage_tags, review_markdown
from infra.registry import CHAMPION, HEAD, MERGE_KEY, champion_version, describe_version, register_merged, set_alias
from infra.settings import Settings
from merging.merger import COEFFICIENTS_PLOT
from merging.scaling_law.decision import DecisionRule
from tasks.caching import content_hash, fresh, tree_hash
from tasks.decide import Decision, LawJob, fit_and_decide
from tasks.evaluate import EvalJob, Scores, evaluate_merged
from tasks.fetch import LocalCheckpoint, merged_experts
from tasks.merge import MergedModel, MergeJob, Upload, upload_merged
from tasks.stages import StageCost
from tasks.tracking import (
    DECISION_TAG,
    EXPERTS_METRIC,
    MACRO_METRIC,
    MERGE_KEY_TAG,
    PREVIOUS_CHAMPION_TAG,
    REASON_TAG,
    RUN_NOTE_TAG,
    MethodRuns,
    experiment_points,
    json_tag,
    log_run,
    method_comparison,
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
    incremental: bool
    stages: dict[str, StageCost]


class StageClock:
    """Wall time per stage as the flow sees it (compute plus orchestration)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._mark = self.started

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._mark
        self._mark = now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.started


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


def compare(scores: Scores, base_scores: Scores, champion) -> Comparison:
    """The new merge's CE per domain against the base's and the current champion's (from its run's metrics)."""
    champion_metrics = read_run(champion.run_id).metrics if champion is not None and champion.run_id else {}
    return Comparison(ce=scores.ce, macro_ce=scores.macro_ce, base_ce=base_scores.ce,
                      base_macro_ce=base_scores.macro_ce,
                      champion_version=str(champion.version) if champion is not None else None,
                      champion_ce={d: champion_metrics[f"ce.{d}"] for d in scores.ce if f"ce.{d}" in champion_metrics},
                      champion_macro_ce=champion_metrics.get(MACRO_METRIC))


def slug(name: str) -> str:
    """NAME as Prefect artifact keys allow: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "base"


def conclude(run_id: str, job: MergeJob, merged: MergedModel, data: LocalCheckpoint, config: PipelineConfig,
             clock: StageClock, settings: Settings) -> Outcome:
    scores = evaluate_merged(eval_job(merged, data, config))
    base_scores = evaluate_merged(eval_job(base_as_model(job), data, config))  # cached after the first run
    clock.lap("evaluate")
    uri = upload_merged(Upload(model=merged, s3_uri=f"s3://{settings.bucket}/merged/{config.base.name}/{run_id}"))
    clock.lap("upload")
    k = len(job.experts)
    methods = experiment_points(config.experiment_name)
    mine = methods.setdefault(content_hash(config.method_identity()), MethodRuns(method=config.method))
    mine.points[merged.key] = (k, scores.macro_ce)
    law = config.law
    points = sorted(mine.points.values())
    law_job = LawJob(method=config.method, points=points, experts=k, loss=scores.macro_ce,
                     rule=DecisionRule(**law.model_dump(include=set(DecisionRule.model_fields))), epsilon=law.epsilon)
    decision = fresh(fit_and_decide, law_job)(law_job)
    clock.lap("fit")
    champion = champion_version(config.base.name, settings=settings)
    beats = champion is None or (champion.tags.get(MERGE_KEY) != merged.key
                                 and scores.macro_ce < float(champion.tags.get(MACRO_METRIC, "inf")))
    comparison = compare(scores, base_scores, champion)
    version = register_merged(config.base.name, uri, run_id, merged.key, settings=settings, tags={
        MACRO_METRIC: f"{scores.macro_ce:.6f}", "method": config.method,
        "experts": json_tag([e.ref.model_dump() for e in job.experts]),
        PREVIOUS_CHAMPION_TAG: champion.version if champion is not None else "none",
        **lineage_tags(job, config.base.name)})
    set_alias(config.base.name, HEAD, version, settings=settings)
    if beats:
        set_alias(config.base.name, CHAMPION, version, settings=settings)
    review = review_markdown(config, job, comparison, decision, version, beats,
                             run_link(run_id, read_run(run_id).experiment_id, settings),
                             {name: tree_hash(path) for name, path in job.calibration.items()})
    describe_version(config.base.name, version, review, settings=settings)
    create_markdown_artifact(review, key=f"merge-{slug(config.base.name)}",
                             description=decision_sentence(config, job, comparison, decision, version, beats))
    clock.lap("register")
    stages = {"merge": merged.cost, "evaluate": scores.cost}
    metrics = score_metrics(scores, k)
    metrics |= {f"stage.{stage}.seconds": seconds for stage, seconds in clock.seconds.items()}
    metrics |= {f"stage.{stage}.compute_seconds": cost.seconds for stage, cost in stages.items()}
    metrics |= {f"stage.{stage}.peak_rss_mb": cost.peak_rss_mb for stage, cost in stages.items()}
    metrics |= {f"law.{name}": value for name, value in (decision.law or {}).items()}
    metrics |= {"predicted_gain": decision.predicted_gain, "predicted_gain_low": decision.gain_low,
                "predicted_gain_high": decision.gain_high, "flow.seconds": clock.total}
    files: list[tuple[str, Path]] = [("", merged.path / "merge_config.yaml")]
    if (merged.path / COEFFICIENTS_PLOT).is_file():
        files.append(("coefficients", merged.path / COEFFICIENTS_PLOT))
    if decision.plot is not None:
        files.append(("law", decision.plot))
    if config.log_model:
        files += [(PurePosixPath("model", path.parent.relative_to(merged.path).as_posix()).as_posix(), path)
                  for path in sorted(merged.path.rglob("*")) if path.is_file()]
    metrics |= {"base_macro_ce": base_scores.macro_ce, "vs_base.macro_ce": scores.macro_ce - base_scores.macro_ce}
    if comparison.champion_macro_ce is not None:
        metrics["vs_champion.macro_ce"] = scores.macro_ce - comparison.champion_macro_ce
    crowned = (k, scores.macro_ce) if beats else (len(merged_experts(champion)), float(champion.tags[MACRO_METRIC]))
    chart, methods_table = method_comparison(methods, crowned, merged.path.parent)
    files.append(("methods", chart))
    log_run(run_id, params=job_params(job, data), metrics=metrics,
            texts={"plan.md": decision.plan_markdown, "review.md": review}, files=files,
            tables={"per_domain.json": domain_table(comparison), "methods.json": methods_table},
            tags={DECISION_TAG: decision.action, REASON_TAG: decision.reason, MERGE_KEY_TAG: merged.key,
                  "mergeplan.incremental": str(merged.incremental).lower(), "mergeplan.merged_uri": uri,
                  "mergeplan.champion": str(beats).lower(), "mergeplan.version": version,
                  PREVIOUS_CHAMPION_TAG: comparison.champion_version or "none",
                  RUN_NOTE_TAG: decision_sentence(config, job, comparison, decision, version, beats)})
    return Outcome(run_id=run_id, merge_key=merged.key, model_path=merged.path, experts=merged.experts,
                   macro_ce=scores.macro_ce, decision=decision, merged_uri=uri, version=version, champion=beats,
                   incremental=merged.incremental, stages=stages)
