"""The stop / continue decision after each new expert, taken from the points measured so far.

Four outcomes, so that a decision is never more confident than its evidence:

- `stop`: the target loss is met, or the law holds and even the upper end of the band of the next expert's
  predicted gain is below `min_gain`;
- `continue`: too few points to fit the law, or the lower end of that band is above `min_gain`;
- `uncertain`: the band straddles `min_gain`, or the fit has no residual degrees of freedom to give a band;
  the pipeline keeps merging (measure more), it does not stop;
- `law_fails`: the points do not follow L(k) = L∞ + A/(k + b) (low R², or the loss rose over the last
  arrivals): the law cannot say when to stop for this method; keep measuring, with caution.

The band is a residual bootstrap of the per-k means: refits (each from the fit's parameters) on fitted +
resampled residuals, rescaled by √(n/(n − 3)) for the three fitted parameters; the predicted gain of expert
k + 1 is taken from each refit. Where several subsets were measured at a k, the subsets are resampled within
each k instead (`bootstrap_curve`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from merging.errors import ConfigError
from merging.scaling_law.curve import CurveBootstrap, CurveFit, bootstrap_curve, fit_curve, refit_means
from merging.scaling_law.planning import marginal_gain

Action = Literal["continue", "stop", "uncertain", "law_fails"]
LAW_PARAMETERS = 3


class DecisionRule(BaseModel):
    """The thresholds of the decision: configuration, so that a backtest and the pipeline share one rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min_gain: float = Field(0.002, gt=0)
    target_loss: float | None = Field(None, gt=0)
    min_points: int = Field(3, ge=LAW_PARAMETERS)  # distinct k needed to fit the law at all
    min_r_squared: float = Field(0.9, le=1)  # below this, the law does not hold for these points
    rising_steps: int = Field(2, ge=1)  # the loss rose over this many consecutive last arrivals: no law
    confidence: float = Field(0.9, gt=0, lt=1)  # two-sided band of the predicted gain
    resamples: int = Field(200, ge=20)
    seed: int = 0


@dataclass(frozen=True)
class Verdict:
    action: Action
    reason: str
    fit: CurveFit | None = None
    predicted_gain: float | None = None  # of expert k + 1, by the fitted law
    gain_band: tuple[float, float] | None = None
    bootstrap: CurveBootstrap | None = None  # the refits the band comes from (its confidence is the rule's)

    @property
    def stops(self) -> bool:
        return self.action == "stop"


def decide(points: list[tuple[int, float]], experts: int, loss: float, rule: DecisionRule) -> Verdict:
    """The decision after measuring `loss` with `experts` merged; `points` are every (k, loss) so far, this one
    included."""
    if rule.target_loss is not None and loss <= rule.target_loss:
        return Verdict("stop", f"stop: target loss {rule.target_loss:g} met: macro CE {loss:.4f} at k={experts}")
    not_met = "" if rule.target_loss is None else f"; target {rule.target_loss:g} not met ({loss:.4f})"
    distinct = sorted({k for k, _ in points})
    if len(distinct) < rule.min_points:
        return Verdict("continue", f"continue: not enough points to fit the law ({len(distinct)} distinct expert "
                                   f"counts {distinct}, {rule.min_points} needed){not_met}")
    try:
        fit = fit_curve([k for k, _ in points], [value for _, value in points])
    except ConfigError as exc:
        return Verdict("law_fails", f"law_fails: the law could not be fitted ({exc}); keep measuring{not_met}")
    gain = float(marginal_gain(fit.params, experts))
    failure = law_failure(fit, rule)
    if failure is not None:
        return Verdict("law_fails", f"law_fails: {failure}; the law cannot say when to stop for this method, keep "
                                    f"measuring with caution{not_met}", fit, gain)
    bootstrap = curve_bootstrap(fit, rule)
    band = gain_band(bootstrap, experts, rule)
    if band is None:
        action = "continue" if gain > rule.min_gain else "uncertain"
        return Verdict(action, f"{action}: expert {experts + 1} would gain {gain:.4g} nats "
                               f"{'>' if action == 'continue' else '<='} min_gain {rule.min_gain:g}, from "
                               f"{len(distinct)} points and 3 parameters: no residual left to bound it{not_met}",
                       fit, gain)
    low, high = band
    action = "stop" if high < rule.min_gain else "continue" if low > rule.min_gain else "uncertain"
    where = {"stop": "entirely below", "continue": "entirely above", "uncertain": "straddles"}[action]
    return Verdict(action, f"{action}: expert {experts + 1} would gain {gain:.4g} nats, "
                           f"{100 * rule.confidence:g}% band [{low:.4g}, {high:.4g}] {where} min_gain "
                           f"{rule.min_gain:g}{not_met}", fit, gain, band, bootstrap)


def law_failure(fit: CurveFit, rule: DecisionRule) -> str | None:
    """Why the points do not follow the law, or None."""
    if not fit.r_squared >= rule.min_r_squared:  # NaN (flat points) fails too
        return f"R² {fit.r_squared:.3f} of the fit < {rule.min_r_squared:g}"
    means = fit.summary.mean
    steps = np.diff(means)[-rule.rising_steps:]
    if steps.size == rule.rising_steps and np.all(steps > 0):
        k = fit.summary.k
        return (f"the loss rose over the last {rule.rising_steps} arrivals "
                f"({', '.join(f'{value:.4f}' for value in means[-rule.rising_steps - 1:])} at k = "
                f"{', '.join(str(int(x)) for x in k[-rule.rising_steps - 1:])}), while the law only falls")
    return None


def curve_bootstrap(fit: CurveFit, rule: DecisionRule) -> CurveBootstrap | None:
    """Refits of the law at `rule.confidence`: subsets resampled within each k where a k has several, else the
    residuals resampled; None when the fit has no residual degree of freedom (as many distinct k as parameters)
    and one row per k."""
    if np.any(fit.summary.count > 1):
        return bootstrap_curve(fit, resamples=rule.resamples, confidence=rule.confidence, seed=rule.seed)
    n = fit.summary.k.size
    if n <= LAW_PARAMETERS:
        return None
    residuals = fit.residuals * np.sqrt(n / (n - LAW_PARAMETERS))
    rng = np.random.default_rng(rule.seed)
    fitted = fit.params.loss(fit.summary.k)
    samples = np.array([refit_means(fit, fitted + residuals[rng.integers(0, n, n)], warm_start=True)
                        for _ in range(rule.resamples)])
    return CurveBootstrap.from_samples(samples, rule.confidence)


def gain_band(bootstrap: CurveBootstrap | None, experts: int, rule: DecisionRule) -> tuple[float, float] | None:
    """The `rule.confidence` band of the gain of expert `experts + 1` over the refits; None without them."""
    if bootstrap is None:
        return None
    tail = 100 * (1 - rule.confidence) / 2
    samples = bootstrap.samples
    x = experts + samples[:, 2]
    gains = samples[:, 1] / (x * (x + 1))
    low, high = np.percentile(gains, [tail, 100 - tail])
    return float(low), float(high)
