"""What every merging flow does once it has a merged model: evaluate it, put it in the store, refit the law on
every point measured so far, decide, log all of it to the flow's MLflow run, and register the model (alias
`champion` when its macro CE beats the current champion's). Called from inside a flow."""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath

from pydantic import BaseModel

from flows.pipeline_config import PipelineConfig
from infra.settings import Settings
from merging.decision import DecisionRule
from merging.merger import COEFFICIENTS_PLOT
from tasks.caching import content_hash, fresh
from tasks.evaluation import EvalJob, Scores, evaluate_merged
from tasks.fetch import LocalCheckpoint
from tasks.law import Decision, LawJob, fit_and_decide
from tasks.merge import MergedModel, MergeJob, Upload, upload_merged
from tasks.registry import MERGE_KEY, champion_version, crown, register_merged
from tasks.stages import StageCost
from tasks.tracking import (
    DECISION_TAG,
    EXPERTS_METRIC,
    MACRO_METRIC,
    MERGE_KEY_TAG,
    REASON_TAG,
    json_tag,
    law_points,
    log_run,
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


def conclude(run_id: str, job: MergeJob, merged: MergedModel, data: LocalCheckpoint, config: PipelineConfig,
             clock: StageClock, settings: Settings) -> Outcome:
    scores = evaluate_merged(eval_job(merged, data, config))
    clock.lap("evaluate")
    uri = upload_merged(Upload(model=merged, s3_uri=f"s3://{settings.bucket}/merged/{config.base.name}/{run_id}"))
    clock.lap("upload")
    k = len(job.experts)
    earlier = law_points(config.experiment_name, content_hash(config.method_identity()))
    law = config.law
    points = sorted((earlier | {merged.key: (k, scores.macro_ce)}).values())
    law_job = LawJob(method=config.method, points=points, experts=k, loss=scores.macro_ce,
                     rule=DecisionRule(**law.model_dump(include=set(DecisionRule.model_fields))), epsilon=law.epsilon)
    decision = fresh(fit_and_decide, law_job)(law_job)
    clock.lap("fit")
    champion = champion_version(config.base.name, settings=settings)
    beats = champion is None or (champion.tags.get(MERGE_KEY) != merged.key
                                 and scores.macro_ce < float(champion.tags.get(MACRO_METRIC, "inf")))
    version = register_merged(config.base.name, uri, run_id, merged.key, settings=settings, tags={
        MACRO_METRIC: f"{scores.macro_ce:.6f}", "method": config.method,
        "experts": json_tag([e.ref.model_dump() for e in job.experts])})
    if beats:
        crown(config.base.name, version, settings=settings)
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
    log_run(run_id, params=job_params(job, data), metrics=metrics, texts={"plan.md": decision.plan_markdown},
            files=files,
            tags={DECISION_TAG: decision.action, REASON_TAG: decision.reason, MERGE_KEY_TAG: merged.key,
                  "mergeplan.incremental": str(merged.incremental).lower(), "mergeplan.merged_uri": uri,
                  "mergeplan.champion": str(beats).lower()})
    return Outcome(run_id=run_id, merge_key=merged.key, model_path=merged.path, experts=merged.experts,
                   macro_ce=scores.macro_ce, decision=decision, merged_uri=uri, version=version, champion=beats,
                   incremental=merged.incremental, stages=stages)
