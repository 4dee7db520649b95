"""Refit the scaling law on the (k, macro CE) points measured so far and decide whether to add another expert.

The rule is merging.scaling_law.decision's (continue / stop / uncertain / law_fails); this task adds the plot
and plan.md.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict

from infra.cache import work_folder
from infra.settings import Settings
from merging.scaling_law.decision import Action, DecisionRule, Verdict, decide
from merging.scaling_law.planning import plan
from merging.scaling_law.plots import plot_loss_vs_experts
from tasks.caching import RESULT_SERIALIZER, content_cache, content_hash


class LawJob(BaseModel):
    model_config = ConfigDict(frozen=True)
    method: str
    points: list[tuple[int, float]]  # (experts merged, macro CE), every measurement so far, this one included
    experts: int  # k of the model just measured
    loss: float  # its macro CE
    rule: DecisionRule
    epsilon: float | None = None

    @property
    def cache_key(self) -> str:
        return content_hash(self.model_dump(mode="json"))

    @property
    def output(self) -> Path:
        return work_folder(Settings.from_env(), "laws", self.cache_key)


class Decision(BaseModel):
    action: Action
    reason: str
    law: dict[str, float] | None = None  # floor, amplitude, offset, r_squared
    predicted_gain: float | None = None  # of expert k+1, by the fitted law
    gain_low: float | None = None  # its band (DecisionRule.confidence)
    gain_high: float | None = None
    plan_markdown: str
    plot: Path | None = None


def decide_job(job: LawJob) -> Decision:
    job.output.mkdir(parents=True, exist_ok=True)
    verdict = decide(job.points, job.experts, job.loss, job.rule)
    low, high = verdict.gain_band or (None, None)
    if verdict.fit is None:
        return Decision(action=verdict.action, reason=verdict.reason, plan_markdown=_markdown(job, verdict))
    fit = verdict.fit
    law = {"floor": fit.params.floor, "amplitude": fit.params.amplitude, "offset": fit.params.offset,
           "r_squared": fit.r_squared}
    return Decision(action=verdict.action, reason=verdict.reason, law=law, predicted_gain=verdict.predicted_gain,
                    gain_low=low, gain_high=high, plan_markdown=_markdown(job, verdict),
                    plot=plot_loss_vs_experts(
                        {job.method: fit}, job.output / "law.png", newest=(job.experts, job.loss),
                        bootstraps={job.method: verdict.bootstrap} if verdict.bootstrap else None))


def _markdown(job: LawJob, verdict: Verdict) -> str:
    lines = [f"# Plan for {job.method}", "", f"**Decision**: {verdict.reason}", "", "| k | macro CE | |",
             "| --- | --- | --- |"]
    this_run = (job.experts, job.loss)
    lines += [f"| {k} | {loss:.4f} | {'this run' if (k, loss) == this_run else ''} |" for k, loss in sorted(job.points)]
    if verdict.fit is not None:
        params = verdict.fit.params
        lines += ["", f"Law: L(k) = {params.floor:.4f} + {params.amplitude:.4f} / (k + {params.offset:.3f}), "
                      f"R² {verdict.fit.r_squared:.3f}; this run's point is "
                      f"{job.loss - float(params.loss(job.experts)):+.4f} off the curve"]
        if verdict.bootstrap is not None:
            low, high = verdict.bootstrap.prediction_band(job.experts + 1)
            lines += ["", f"Predicted L({job.experts + 1}) = {float(params.loss(job.experts + 1)):.4f}, "
                          f"{100 * verdict.bootstrap.confidence:g}% band [{low[0]:.4f}, {high[0]:.4f}]"]
        if verdict.action != "law_fails":
            answer = plan(params, target=job.rule.target_loss, epsilon=job.epsilon, tau=job.rule.min_gain)
            lines += ["", answer.sentence]
    return "\n".join(lines) + "\n"


@task(name="fit-law", cache_policy=content_cache(), persist_result=True, result_serializer=RESULT_SERIALIZER)
def fit_and_decide(job: LawJob) -> Decision:
    return decide_job(job)
