"""Plan answers from a fit folder: one sentence per method on how many experts to merge (or whether a bigger base
pays better), and the method to merge with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from merging.errors import ConfigError
from merging.scaling_law.curve import CurveParams
from merging.scaling_law.decision import DecisionRule
from merging.scaling_law.fit_folder import FIT_FILE, FitFolder, load_fit
from merging.scaling_law.joint import JointParams
from merging.scaling_law.planning import experts_for_target, plan, size_or_experts
from merging.scaling_law.sweep_curves import MACRO

RECOMMENDATION = "recommended"  # the PlanLine that compares the methods


class PlanRequest(BaseModel):
    """A question for a fit folder; at least one of target_loss, epsilon, min_gain, or the two costs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str | None = None  # default: every method of the fit, one sentence each
    domain: str = MACRO
    size: str | None = None  # default: the largest base measured
    target_loss: float | None = None
    epsilon: float | None = Field(None, gt=0)
    min_gain: float | None = Field(None, gt=0)
    expert_cost: float | None = Field(None, gt=0)  # cost of one more expert (e.g. GPU-hours to fine-tune it)
    next_size_cost: float | None = Field(None, gt=0)  # cost of moving to the next base size, same unit
    next_size: str | None = None  # default: the next bigger size measured
    experts: int | None = Field(None, ge=1)  # experts at which to compare (default: the plan's answer, else M)


@dataclass(frozen=True)
class PlanLine:
    method: str
    sentence: str


def plan_from_fit(folder: str | Path, request: PlanRequest) -> list[PlanLine]:
    """One sentence per method (or for `request.method`) answering the request from a fit folder."""
    fit = load_fit(folder)
    if request.target_loss is None and request.epsilon is None and request.min_gain is None and (
            request.expert_cost is None or request.next_size_cost is None):
        raise ConfigError("plan needs a question: --target-loss, --epsilon, --min-gain, or --expert-cost with "
                          "--next-size-cost")
    size = request.size or max(fit.sizes, key=lambda name: fit.sizes[name]["n_params_b"])
    if size not in fit.sizes:
        raise ConfigError(f"{fit.folder / FIT_FILE}: no size {size!r}; sizes are {', '.join(fit.sizes)}")
    methods = [request.method] if request.method else fit.document["methods"]
    where = f"at size {size} ({fit.sizes[size]['n_params_b']:.3g}B)" if len(fit.sizes) > 1 else ""
    lines = [PlanLine(method, _plan_sentence(fit, size, method, request, where)) for method in methods]
    if len(methods) > 1:
        lines.append(PlanLine(RECOMMENDATION, _recommend(fit, size, methods, request)))
    return lines


def _recommend(fit: FitFolder, size: str, methods: list[str], request: PlanRequest) -> str:
    """The method to merge with: among those whose points follow the law (R² ≥ the decision rule's), the one
    that reaches the target with the fewest experts, or without a target (or when none reaches it) the one
    with the lowest floor."""
    min_r_squared = DecisionRule().min_r_squared
    curves = {method: fit.curve(size, method, request.domain) for method in methods}
    following = {method: record for method, record in curves.items() if record["r_squared"] >= min_r_squared}
    failing = [f"{method} (R² {curves[method]['r_squared']:.2f})" for method in methods if method not in following]
    excluded = f"; {', '.join(failing)} left out: the law does not hold for them" if failing else ""
    if not following:
        return f"no method follows the law (R² ≥ {min_r_squared:g}){excluded}: compare measured losses instead"
    params = {method: CurveParams(**record["params"]) for method, record in following.items()}
    if request.target_loss is not None:
        reach = {method: experts_for_target(law, request.target_loss) for method, law in params.items()}
        reachable = {method: answer.experts for method, answer in reach.items() if answer.reachable}
        if reachable:
            best = min(reachable, key=lambda method: (reachable[method], params[method].floor))
            others = ", ".join(f"{method} {experts}" for method, experts in sorted(reachable.items(),
                                                                                  key=lambda item: item[1])
                               if method != best)
            return (f"{best}: reaches {request.target_loss:g} with {reachable[best]} experts (predicted "
                    f"{float(params[best].loss(reachable[best])):.4g})" + (f"; {others}" if others else "")
                    + excluded)
    best = min(params, key=lambda method: params[method].floor)
    floors = ", ".join(f"{method} {law.floor:.4g}" for method, law in sorted(params.items(),
                                                                             key=lambda item: item[1].floor))
    unreached = "" if request.target_loss is None else f"no method reaches {request.target_loss:g}; "
    return f"{best}: {unreached}the lowest floor (L∞ {floors}){excluded}"


def _plan_sentence(fit: FitFolder, size: str, method: str, request: PlanRequest, where: str) -> str:
    record = fit.curve(size, method, request.domain)
    params = CurveParams(**record["params"])
    pool = fit.sizes[size]["pool_size"]
    joint = fit.joint(method, request.domain)
    clauses = [where] if where else []
    experts = request.experts
    if request.target_loss is not None or request.epsilon is not None or request.min_gain is not None:
        answer = plan(params, target=request.target_loss, epsilon=request.epsilon, tau=request.min_gain,
                      bootstrap=fit.bootstrap(size, method, request.domain), joint=joint)
        clauses.append(answer.sentence)
        needed = [n for n in (answer.target.experts if answer.target else None, answer.experts_within_epsilon)
                  if n is not None]
        if needed and max(needed) > pool:
            clauses.append(f"{max(needed)} experts is beyond the {pool} measured: an extrapolation of the law")
        if answer.target is not None and not answer.target.reachable and joint is None:
            clauses.append(f"sweep several base sizes (a joint fit) to tell which size would reach "
                           f"{request.target_loss:g}")
        experts = experts or answer.stop_at or (answer.target.experts if answer.target else None)
    if request.expert_cost is not None and request.next_size_cost is not None:
        clauses.append(_size_advice(fit, size, method, request, joint, experts or pool))
    return "; ".join(clauses)


def _size_advice(fit: FitFolder, size: str, method: str, request: PlanRequest, joint: JointParams | None,
                 experts: int) -> str:
    if joint is None:
        raise ConfigError(f"size vs experts needs a joint fit over 2 or more base sizes, and {fit.folder} has none "
                          f"for {method}, {request.domain}; sweep a zoo with several sizes")
    bigger = sorted((info["n_params_b"], name) for name, info in fit.sizes.items()
                    if info["n_params_b"] > fit.sizes[size]["n_params_b"])
    next_size = request.next_size or (bigger[0][1] if bigger else None)
    if next_size is None:
        raise ConfigError(f"{size} is the largest size of the fit, so there is no bigger base to compare with; "
                          "pass --size with a smaller one")
    if next_size not in fit.sizes:
        raise ConfigError(f"--next-size: no size {next_size!r} in the fit; sizes are {', '.join(fit.sizes)}")
    advice = size_or_experts(joint, size=fit.sizes[size]["n_params_b"], experts=experts,
                             next_size=fit.sizes[next_size]["n_params_b"], expert_cost=request.expert_cost,
                             next_size_cost=request.next_size_cost)
    return advice.recommendation
