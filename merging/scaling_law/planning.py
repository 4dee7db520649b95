"""Planning with a fitted curve: experts to come within ε of the floor or to reach a target, the stop rule for
marginal gains, the fraction of the k = 1 → M gain realised, whether a bigger base beats more experts per unit
cost, and the one-sentence plan that combines them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from merging.errors import ConfigError
from merging.scaling_law.curve import CurveBootstrap, CurveParams, _expert_counts, _losses
from merging.scaling_law.joint import JointParams

_ROUNDING_SLACK = 1e-9  # so that 7.000000000000002 experts (float noise) rounds up to 7, not 8


@dataclass(frozen=True)
class TargetAnswer:
    reachable: bool
    experts: int | None  # experts needed when reachable
    floor: float  # L∞ at this size
    size_threshold: float | None  # with a joint fit: any base above this many billions has its floor below target
    reason: str  # one line


@dataclass(frozen=True, eq=False)
class Realisation:
    """R(k) = (L(1) − L(k)) / (L(1) − L(M)): the fraction of the k = 1 → M gain realised at k."""

    k: np.ndarray
    fraction: np.ndarray
    k80: int | None  # first k with R ≥ 0.8; None if never
    k90: int | None


@dataclass(frozen=True)
class SizeVsExperts:
    expert_gain_per_cost: float  # |∂L/∂k| at (N, k) per unit cost of one expert
    size_gain_per_cost: float  # (L(N, k) − L(N2, k)) per unit cost of moving to N2
    recommendation: str


@dataclass(frozen=True)
class PlanAnswer:
    sentence: str
    target: TargetAnswer | None
    experts_within_epsilon: int | None
    stop_at: int | None


def _ceil(x: float) -> int:
    return math.ceil(x - _ROUNDING_SLACK)


def experts_for_epsilon(params: CurveParams, epsilon: float) -> int:
    """Experts needed to come within ε of the floor: ceil(A/ε − b), at least 1."""
    if not epsilon > 0:
        raise ConfigError(f"epsilon must be > 0 (a loss gap above the floor, e.g. 0.01), got {epsilon}")
    return max(1, _ceil(params.amplitude / epsilon - params.offset))


def experts_for_target(params: CurveParams, target: float, joint: JointParams | None = None) -> TargetAnswer:
    """Experts needed to reach `target`: ceil(A/(target − L∞) − b) when target > L∞; else unreachable at this size.

    When unreachable and a joint fit is given, `size_threshold` is the base size beyond which the floor drops
    below the target (None, with the reason, when no size does).
    """
    if target > params.floor:
        experts = max(1, _ceil(params.amplitude / (target - params.floor) - params.offset))
        return TargetAnswer(True, experts, params.floor, None,
                            f"{experts} experts reach {target:g} (floor {params.floor:.4g})")
    reason = f"{target:g} is at or below the floor {params.floor:.4g} at this size: no number of experts reaches it"
    if joint is None:
        return TargetAnswer(False, None, params.floor, None, f"{reason}; a bigger base is needed")
    threshold = joint.size_for_floor_below(target)
    if threshold is None:
        return TargetAnswer(False, None, params.floor, None,
                            f"{reason}, and no base size does (the floor tends to L* = {joint.floor_limit:.4g})")
    return TargetAnswer(False, None, params.floor, threshold,
                        f"{reason}; a base above {threshold:.3g}B has its floor below {target:g}")


def marginal_gain(params: CurveParams, k: ArrayLike) -> np.ndarray:
    """L(k) − L(k + 1) = A / ((k + b)(k + 1 + b)): what the (k+1)-th expert gains."""
    x = np.asarray(k, dtype=float) + params.offset
    return params.amplitude / (x * (x + 1))


def stop_at(params: CurveParams, tau: float) -> int:
    """The first k (≥ 1) whose next expert gains less than τ: ceil(−b − ½ + sqrt(¼ + A/τ)).

    The closed form is then nudged to agree exactly with `marginal_gain` (so gain(k_stop) < τ ≤ gain(k_stop − 1)),
    because at a root that is a whole number the gain equals τ and the closed form would stop one expert early.
    """
    if not tau > 0:
        raise ConfigError(f"tau must be > 0 (the smallest loss gain worth one more expert), got {tau}")
    k = max(1, math.ceil(-params.offset - 0.5 + math.sqrt(0.25 + params.amplitude / tau)))
    while marginal_gain(params, k) >= tau:
        k += 1
    while k > 1 and marginal_gain(params, k - 1) < tau:
        k -= 1
    return k


def realisation(k: ArrayLike, loss: ArrayLike) -> Realisation:
    """R(k) from losses at k = 1 … M (measured means or a fitted curve); M is the largest k given."""
    counts = _expert_counts(k)
    values = _losses(loss, counts.size)
    if np.unique(counts).size != counts.size:
        raise ConfigError("the realised fraction takes one loss per k; pass the per-k means, not subset rows")
    order = np.argsort(counts)
    counts, values = counts[order], values[order]
    if counts[0] != 1:
        raise ConfigError("the realised fraction is relative to k = 1, which is missing; include single experts")
    total_gain = values[0] - values[-1]
    if total_gain == 0:
        raise ConfigError("L(1) equals L(M), so there is no gain to realise; check the losses")
    fraction = (values[0] - values) / total_gain
    return Realisation(counts, fraction, _first_reaching(counts, fraction, 0.8), _first_reaching(counts, fraction, 0.9))


def fitted_realisation(params: CurveParams, pool_size: int) -> Realisation:
    """R(k) on the fitted curve for k = 1 … M."""
    if pool_size < 2:
        raise ConfigError(f"the realised fraction needs a pool of at least 2 experts, got {pool_size}")
    k = np.arange(1, pool_size + 1)
    return realisation(k, params.loss(k))


def _first_reaching(k: np.ndarray, fraction: np.ndarray, level: float) -> int | None:
    # The slack keeps a fraction that is exactly the level on paper (e.g. 0.9) from missing it by float noise.
    reached = np.flatnonzero(fraction >= level - 1e-12)
    return int(k[reached[0]]) if reached.size else None


def size_or_experts(joint: JointParams, *, size: float, experts: int, next_size: float, expert_cost: float,
                    next_size_cost: float) -> SizeVsExperts:
    """Compare |∂L/∂k| per unit expert cost at (N, k) with (L(N, k) − L(N2, k)) per unit cost of moving to N2."""
    if not next_size > size > 0:
        raise ConfigError(f"next_size ({next_size}) must be a bigger base than size ({size}), both in billions")
    if not (expert_cost > 0 and next_size_cost > 0):
        raise ConfigError("expert_cost and next_size_cost must be > 0, in the same unit (e.g. GPU-hours)")
    if experts < 1:
        raise ConfigError(f"experts must be >= 1, got {experts}")
    expert_gain = float(abs(joint.curve_at(size).slope(experts))) / expert_cost
    size_gain = float(joint.loss(size, experts) - joint.loss(next_size, experts)) / next_size_cost
    comparison = (f"{expert_gain:.3g} nats per unit cost from one more expert vs {size_gain:.3g} from moving "
                  f"{size:g}B -> {next_size:g}B at {experts} experts")
    if expert_gain >= size_gain:
        return SizeVsExperts(expert_gain, size_gain, f"add experts: {comparison}")
    return SizeVsExperts(expert_gain, size_gain, f"move to the {next_size:g}B base: {comparison}")


def plan(params: CurveParams, *, target: float | None = None, epsilon: float | None = None,
         tau: float | None = None, bootstrap: CurveBootstrap | None = None,
         joint: JointParams | None = None) -> PlanAnswer:
    """Answer "how many experts?" in one sentence from the fitted L∞, A, b.

    e.g. "8 experts reach 1.9 (predicted 1.897 ± 0.004); the 9th would gain 0.0011 < 0.002: stop at 8".
    ± is half the bootstrap's prediction interval at that k, when a bootstrap is given.
    """
    if target is None and epsilon is None and tau is None:
        raise ConfigError("plan needs a target loss, an epsilon above the floor, or a stop threshold tau; pass one")
    clauses = []
    target_answer = None if target is None else experts_for_target(params, target, joint)
    if target_answer is not None:
        if target_answer.reachable:
            clauses.append(f"{target_answer.experts} experts reach {target:g} "
                           f"({_predicted(params, target_answer.experts, bootstrap)})")
        else:
            clauses.append(target_answer.reason)
    within_epsilon = None if epsilon is None else experts_for_epsilon(params, epsilon)
    if within_epsilon is not None:
        clauses.append(f"{within_epsilon} experts come within {epsilon:g} of the floor {params.floor:.4g} "
                       f"({_predicted(params, within_epsilon, bootstrap)})")
    stop = None if tau is None else stop_at(params, tau)
    if stop is not None:
        clauses.append(f"the {_ordinal(stop + 1)} would gain {float(marginal_gain(params, stop)):.2g} < {tau:g}: "
                       f"stop at {stop}")
    sentence = "; ".join(clauses)
    return PlanAnswer(sentence[0].upper() + sentence[1:], target_answer, within_epsilon, stop)


def _predicted(params: CurveParams, k: int, bootstrap: CurveBootstrap | None) -> str:
    text = f"predicted {float(params.loss(k)):.4g}"
    return text if bootstrap is None else f"{text} ± {bootstrap.half_width(k):.2g}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
