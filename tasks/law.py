"""Refit the scaling law on the (k, macro CE) points measured so far and decide whether to add another expert.

Continue when the predicted gain of expert k+1 is above min_gain and the target loss is not met; stop otherwise.
With fewer than three distinct k the law cannot be fitted: the decision is to continue, and it says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import BaseModel, ConfigDict

from infra.settings import Settings
from merging.errors import ConfigError
from merging.plots import plot_loss_vs_experts
from merging.scaling_law import CurveParams, fit_curve, marginal_gain, plan
from tasks.caching import RESULT_SERIALIZER, content_cache, content_hash

MIN_DISTINCT_K = 3


class LawJob(BaseModel):
    model_config = ConfigDict(frozen=True)
    method: str
    points: list[tuple[int, float]]  # (experts merged, macro CE), every measurement so far, this one included
    experts: int  # k of the model just measured
    loss: float  # its macro CE
    min_gain: float
    target_loss: float | None = None
    epsilon: float | None = None

    @property
    def cache_key(self) -> str:
        return content_hash(self.model_dump(mode="json"))

    @property
    def output(self) -> Path:
        return (Settings.from_env().state_dir / "work" / "laws" / self.cache_key).resolve()


class Decision(BaseModel):
    action: Literal["continue", "stop"]
    reason: str
    law: dict[str, float] | None = None  # floor, amplitude, offset, r_squared
    predicted_gain: float | None = None  # of expert k+1, by the fitted law
    plan_markdown: str
    plot: Path | None = None


def decide(job: LawJob) -> Decision:
    job.output.mkdir(parents=True, exist_ok=True)
    distinct = sorted({k for k, _ in job.points})
    target_met = job.target_loss is not None and job.loss <= job.target_loss
    if target_met:
        reason = f"target loss {job.target_loss:g} met: macro CE {job.loss:.4f} at k={job.experts}"
    if len(distinct) < MIN_DISTINCT_K:
        if target_met:
            return Decision(action="stop", reason=reason, plan_markdown=_markdown(job, reason, None))
        reason = (f"continue: not enough points to fit the law ({len(distinct)} distinct expert counts "
                  f"{distinct}, {MIN_DISTINCT_K} needed)")
        return Decision(action="continue", reason=reason, plan_markdown=_markdown(job, reason, None))
    try:
        fit = fit_curve([k for k, _ in job.points], [loss for _, loss in job.points])
    except ConfigError as exc:
        reason = f"continue: the law could not be fitted ({exc})"
        return Decision(action="continue", reason=reason, plan_markdown=_markdown(job, reason, None))
    gain = float(marginal_gain(fit.params, job.experts))
    if not target_met:
        action = "continue" if gain > job.min_gain else "stop"
        comparison = ">" if action == "continue" else "<="
        reason = (f"{action}: expert {job.experts + 1} would gain {gain:.4g} nats {comparison} min_gain "
                  f"{job.min_gain:g}" + ("" if job.target_loss is None else
                                         f"; target {job.target_loss:g} not met ({job.loss:.4f})"))
    else:
        action = "stop"
    plot = plot_loss_vs_experts({job.method: fit}, job.output / "law.png")
    law = {"floor": fit.params.floor, "amplitude": fit.params.amplitude, "offset": fit.params.offset,
           "r_squared": fit.r_squared}
    return Decision(action=action, reason=reason, law=law, predicted_gain=gain, plot=plot,
                    plan_markdown=_markdown(job, reason, fit.params))


def _markdown(job: LawJob, reason: str, params: CurveParams | None) -> str:
    lines = [f"# Plan for {job.method}", "", f"**Decision**: {reason}", "", "| k | macro CE |", "| --- | --- |"]
    lines += [f"| {k} | {loss:.4f} |" for k, loss in sorted(job.points)]
    if params is not None:
        lines += ["", f"Law: L(k) = {params.floor:.4f} + {params.amplitude:.4f} / (k + {params.offset:.3f})", "",
                  plan(params, target=job.target_loss, epsilon=job.epsilon, tau=job.min_gain).sentence]
    return "\n".join(lines) + "\n"


@task(name="fit-law", cache_policy=content_cache(), persist_result=True, result_serializer=RESULT_SERIALIZER)
def fit_and_decide(job: LawJob) -> Decision:
    return decide(job)
