"""The merging scaling law (arXiv 2509.24244): fit E[L | N, k] = L∞(N) + A(N) / (k + b) and plan with it.

- Per-size fit of L(k) = L∞ + A/(k + b) on the per-k means of subset losses, with bootstrap CIs.
- Joint fit over base sizes: L(N, k) = L* + B·N^−β + A0·N^−γ / (k + b), N in billions of parameters.
- Variance over subsets: Var(k) = c·(1/k − 1/M) for subsets drawn from a finite pool of M experts.
- Three-point forecast: fit on k ∈ {1, 2, 4} only and predict the rest of the curve.
- Planning: experts to come within ε of the floor or to reach a target, the stop rule for marginal gains, the
  fraction of the k = 1 → M gain realised, and whether a bigger base beats more experts per unit cost.

Every fit is deterministic: start points come from a fixed grid, and the bootstrap takes a seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import least_squares, nnls

from merging.errors import ConfigError

logger = logging.getLogger("mergeplan")

OFFSET_MAX = 100.0  # beyond this, A/(k + b) is a straight line over any realistic k, and A, b trade off freely
EXPONENT_MAX = 4.0  # β, γ: the paper's fits lie in 0–0.5; the bound only keeps a flat direction from drifting
THREE_POINT_K = (1, 2, 4)
_OFFSET_STARTS = (0.0, 0.25, 1.0, 4.0, 16.0)
_JOINT_OFFSET_STARTS = (0.0, 0.5, 3.0)
_FLOOR_EXPONENT_STARTS = (0.1, 0.3, 0.6, 1.2)
_AMPLITUDE_EXPONENT_STARTS = (0.0, 0.15, 0.5)
_SOLVER_TOLERANCES = {"ftol": 1e-12, "xtol": 1e-12, "gtol": 1e-12}
_ROUNDING_SLACK = 1e-9  # so that 7.000000000000002 experts (float noise) rounds up to 7, not 8


# ---------------------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class CurveParams:
    """L(k) = floor + amplitude / (k + offset): the paper's L∞, A and b at one base size."""

    floor: float
    amplitude: float
    offset: float

    def loss(self, k: ArrayLike) -> np.ndarray:
        return self.floor + self.amplitude / (np.asarray(k, dtype=float) + self.offset)

    def slope(self, k: ArrayLike) -> np.ndarray:
        """dL/dk (negative: each expert lowers the loss)."""
        return -self.amplitude / (np.asarray(k, dtype=float) + self.offset) ** 2


@dataclass(frozen=True, eq=False)
class KSummary:
    """Per-k statistics of the subset losses: the points the law is fitted to."""

    k: np.ndarray  # distinct expert counts, ascending
    mean: np.ndarray
    std: np.ndarray  # sample standard deviation over subsets (ddof 1); NaN where only one subset was measured
    count: np.ndarray


@dataclass(frozen=True, eq=False)
class CurveFit:
    """A per-size fit; `subset_k`, `subset_loss` are the finite input rows, kept for the bootstrap and plots."""

    params: CurveParams
    r_squared: float  # unweighted, of the per-k means against the fitted curve
    summary: KSummary
    subset_k: np.ndarray
    subset_loss: np.ndarray
    offset_max: float

    @property
    def residuals(self) -> np.ndarray:
        """Measured mean minus fitted loss, per k of `summary`."""
        return self.summary.mean - self.params.loss(self.summary.k)


@dataclass(frozen=True, eq=False)
class CurveBootstrap:
    """Percentile intervals from refits on subsets resampled with replacement within each k."""

    samples: np.ndarray  # (resamples, 3): floor, amplitude, offset of each refit
    confidence: float
    low: CurveParams
    high: CurveParams

    @classmethod
    def from_samples(cls, samples: np.ndarray, confidence: float) -> CurveBootstrap:
        low, high = _percentile_interval(samples, confidence)
        return cls(samples, confidence, CurveParams(*map(float, low)), CurveParams(*map(float, high)))

    def prediction_band(self, k: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper percentile of the predicted L(k) over the resamples, pointwise in k."""
        grid = np.atleast_1d(np.asarray(k, dtype=float))
        curves = self.samples[:, :1] + self.samples[:, 1:2] / (grid[None, :] + self.samples[:, 2:3])
        return _percentile_interval(curves, self.confidence)

    def half_width(self, k: float) -> float:
        low, high = self.prediction_band(k)
        return float((high[0] - low[0]) / 2)


@dataclass(frozen=True)
class VarianceLaw:
    """Spread of the subset losses over subsets of size k from a pool of M experts."""

    pool_size: int
    finite_pool_constant: float  # c in Var(k) = c·(1/k − 1/M)
    finite_pool_r_squared: float
    plain_constant: float  # c in Var(k) = c/k, fitted on k < M only (Var is zero at k = M by construction)
    plain_r_squared: float

    def finite_pool_variance(self, k: ArrayLike) -> np.ndarray:
        return self.finite_pool_constant * (1 / np.asarray(k, dtype=float) - 1 / self.pool_size)

    def plain_variance(self, k: ArrayLike) -> np.ndarray:
        return self.plain_constant / np.asarray(k, dtype=float)


@dataclass(frozen=True, eq=False)
class ThreePointForecast:
    """A curve fitted on k = 1, 2, 4 alone, set against every measured mean."""

    params: CurveParams  # fitted on the means at k = 1, 2, 4 only
    k: np.ndarray  # every measured k
    measured: np.ndarray  # measured mean per k
    predicted: np.ndarray
    pool_size: int
    relative_error_at_pool: float  # (predicted − measured) / measured at k = pool_size; signed


@dataclass(frozen=True)
class JointParams:
    """L(N, k) = L* + B·N^−β + A0·N^−γ / (k + b), N in billions of parameters."""

    floor_limit: float  # L*: the floor as N grows without bound
    floor_scale: float  # B
    floor_exponent: float  # β
    amplitude_scale: float  # A0
    amplitude_exponent: float  # γ
    offset: float  # b

    def floor(self, n: ArrayLike) -> np.ndarray:
        return self.floor_limit + self.floor_scale * np.asarray(n, dtype=float) ** -self.floor_exponent

    def amplitude(self, n: ArrayLike) -> np.ndarray:
        return self.amplitude_scale * np.asarray(n, dtype=float) ** -self.amplitude_exponent

    def loss(self, n: ArrayLike, k: ArrayLike) -> np.ndarray:
        return self.floor(n) + self.amplitude(n) / (np.asarray(k, dtype=float) + self.offset)

    def curve_at(self, n: float) -> CurveParams:
        return CurveParams(float(self.floor(n)), float(self.amplitude(n)), self.offset)

    def size_for_floor_below(self, target: float) -> float | None:
        """The size N* beyond which the floor is below `target`; None when no size gets there.

        Solves L* + B·N^−β < target, i.e. N > (B / (target − L*))^(1/β).
        """
        if target <= self.floor_limit or self.floor_scale == 0 or self.floor_exponent == 0:
            return None
        return float((self.floor_scale / (target - self.floor_limit)) ** (1 / self.floor_exponent))


@dataclass(frozen=True, eq=False)
class JointFit:
    params: JointParams
    r_squared: float  # unweighted, of the per-(N, k) means against the fitted surface
    n: np.ndarray  # one entry per measured (N, k) pair
    k: np.ndarray
    mean: np.ndarray
    count: np.ndarray


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


# ---------------------------------------------------------------------------------------------------------------
# Input checks


def _expert_counts(k: ArrayLike) -> np.ndarray:
    counts = np.asarray(k, dtype=float)
    if counts.ndim != 1 or not np.all(np.isfinite(counts)) or np.any(counts < 1) or np.any(counts != np.round(counts)):
        raise ConfigError("expert counts k must be whole numbers >= 1, one per measured subset; check the k column")
    return counts.astype(int)


def _losses(loss: ArrayLike, rows: int, what: str = "losses") -> np.ndarray:
    values = np.asarray(loss, dtype=float)
    if values.shape != (rows,):
        raise ConfigError(f"got {rows} expert counts but {values.size} {what}; pass one of each per row")
    return values


def _keep_finite(loss: np.ndarray) -> np.ndarray:
    keep = np.isfinite(loss)
    dropped = int(loss.size - keep.sum())
    if dropped:
        logger.warning("dropped %d of %d rows with a non-finite loss (NaN or inf)", dropped, loss.size)
    return keep


def _finite_rows(k: ArrayLike, loss: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    counts = _expert_counts(k)
    values = _losses(loss, counts.size)
    keep = _keep_finite(values)
    return counts[keep], values[keep]


def _require_bound(name: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{name} must be >= 0 (an upper bound on a parameter that is itself >= 0), got {value}")


def _require_distinct_k(k: np.ndarray) -> None:
    distinct = np.unique(k).size
    if distinct < 3:
        raise ConfigError(f"the law has 3 parameters (L∞, A, b), so it needs at least 3 distinct expert counts k; "
                          f"got {distinct}: measure more values of k")


# ---------------------------------------------------------------------------------------------------------------
# Per-size fit


def summarise_by_k(k: ArrayLike, loss: ArrayLike) -> KSummary:
    """Mean, standard deviation and count of the finite losses at each k; non-finite rows are dropped (warned)."""
    return _summary(*_finite_rows(k, loss))


def _summary(k: np.ndarray, loss: np.ndarray) -> KSummary:
    distinct, group, count = np.unique(k, return_inverse=True, return_counts=True)
    mean = np.bincount(group, weights=loss) / count
    squares = np.bincount(group, weights=(loss - mean[group]) ** 2)
    std = np.where(count > 1, np.sqrt(squares / np.maximum(count - 1, 1)), np.nan)
    return KSummary(k=distinct, mean=mean, std=std, count=count)


def fit_curve(k: ArrayLike, loss: ArrayLike, *, offset_max: float = OFFSET_MAX) -> CurveFit:
    """Fit L(k) = L∞ + A/(k + b) to the per-k means of subset losses (one row per subset, or one mean per k).

    Weighted least squares with weights ∝ k (residual·√k), all parameters ≥ 0 and b ≤ `offset_max`; bounded
    trust-region ("trf") from a grid of start points, keeping the best. R² is unweighted, on the means.
    """
    _require_bound("offset_max", offset_max)
    counts, values = _finite_rows(k, loss)
    _require_distinct_k(counts)
    summary = _summary(counts, values)
    params = _fit_law(summary.k, summary.mean, offset_max)
    if offset_max > 0 and params.offset >= offset_max * (1 - 1e-6):
        logger.warning("the fitted b hit its bound %g: the curve is almost linear in k over the measured range, "
                       "so A and b are poorly determined", offset_max)
    r_squared = _r_squared(summary.mean, params.loss(summary.k))
    return CurveFit(params, r_squared, summary, counts, values, offset_max)


def _fit_law(k: np.ndarray, mean: np.ndarray, offset_max: float, start: CurveParams | None = None) -> CurveParams:
    """The best of the start grid; from `start` alone when given (a bootstrap refit near a known fit)."""
    x = k.astype(float)
    weights = np.sqrt(x)

    def residuals(p: np.ndarray) -> np.ndarray:
        return weights * (p[0] + p[1] / (x + p[2]) - mean)

    def jacobian(p: np.ndarray) -> np.ndarray:
        inverse = 1 / (x + p[2])
        return weights[:, None] * np.column_stack([np.ones_like(x), inverse, -p[1] * inverse**2])

    # For a fixed b the law is linear in (L∞, A), so each grid value of b gets its best non-negative (L∞, A).
    starts = [[*_nonnegative_lstsq(np.column_stack([np.ones_like(x), 1 / (x + b)]), mean, weights), b]
              for b in sorted({min(b, offset_max) for b in _OFFSET_STARTS})] if start is None else [
        [start.floor, start.amplitude, start.offset]]
    best = _best_least_squares(residuals, jacobian, starts, [0.0, 0.0, 0.0], [np.inf, np.inf, offset_max])
    return CurveParams(*(float(v) for v in best))


def _nonnegative_lstsq(design: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    solution, _ = nnls(design * weights[:, None], target * weights)
    return solution


def _best_least_squares(residuals: Callable[[np.ndarray], np.ndarray], jacobian: Callable[[np.ndarray], np.ndarray],
                        starts: list[list[float]], lower: list[float], upper: list[float]) -> np.ndarray:
    best_cost, best_x = np.inf, None
    for start in starts:
        result = least_squares(residuals, np.clip(start, lower, upper), jac=jacobian, bounds=(lower, upper),
                               method="trf", **_SOLVER_TOLERANCES)
        if result.cost < best_cost:
            best_cost, best_x = result.cost, result.x
    return best_x


def _r_squared(observed: np.ndarray, fitted: np.ndarray) -> float:
    """1 − SS_res/SS_tot; NaN when the observations do not vary (nothing to explain)."""
    total = float(np.sum((observed - observed.mean()) ** 2))
    return 1 - float(np.sum((observed - fitted) ** 2)) / total if total > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_curve(fit: CurveFit, *, resamples: int = 200, confidence: float = 0.95, seed: int = 0) -> CurveBootstrap:
    """Percentile CIs of L∞, A, b: resample the subsets within each k with replacement and refit the means.

    A k measured once (such as k = M) gives the same mean in every resample.
    """
    if resamples < 2:
        raise ConfigError(f"bootstrap resamples must be at least 2, got {resamples}; the default is 200")
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence}")
    if np.all(fit.summary.count == 1):
        raise ConfigError("the bootstrap needs several subsets per k, but every k has one row; "
                          "pass the per-subset losses, not the per-k means")
    rng = np.random.default_rng(seed)
    resampled_means = np.empty((resamples, fit.summary.k.size))
    for column, k in enumerate(fit.summary.k):
        group = fit.subset_loss[fit.subset_k == k]
        resampled_means[:, column] = group[rng.integers(0, group.size, size=(resamples, group.size))].mean(axis=1)
    return CurveBootstrap.from_samples(np.array([refit_means(fit, means) for means in resampled_means]), confidence)


def refit_means(fit: CurveFit, means: np.ndarray, warm_start: bool = False) -> tuple[float, float, float]:
    """(L∞, A, b) of the law refitted, as `fit` was, to other per-k means at the same k (a bootstrap draw);
    with `warm_start`, from `fit`'s parameters only instead of the start grid (five times faster)."""
    params = _fit_law(fit.summary.k, means, fit.offset_max, fit.params if warm_start else None)
    return params.floor, params.amplitude, params.offset


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return low, high


# ---------------------------------------------------------------------------------------------------------------
# Variance law


def subset_variance(summary: KSummary, pool_size: int) -> np.ndarray:
    """Variance of the subset losses at each k, in the form the finite-pool law describes.

    Where as many subsets as C(M, k) were measured (taken to be all of them), they are the whole population, so
    the variance is over them with ddof 0: the law then holds exactly, and at k = M it is 0. Elsewhere the subsets
    are a sample and the usual ddof-1 estimate applies (NaN with a single subset).
    """
    if pool_size < summary.k.max():
        raise ConfigError(f"pool size M = {pool_size} is smaller than the largest k ({summary.k.max()}); "
                          "pass the number of experts subsets were drawn from")
    complete = summary.count == np.array([math.comb(pool_size, int(k)) for k in summary.k])
    sample_variance = summary.std**2
    population_variance = np.nan_to_num(sample_variance) * (summary.count - 1) / summary.count
    return np.where(complete, population_variance, sample_variance)


def fit_variance_law(k: ArrayLike, variance: ArrayLike, pool_size: int) -> VarianceLaw:
    """Fit Var(k) = c·(1/k − 1/M) and the plain Var(k) = c/k by least squares through the origin (unweighted).

    Non-finite variances (a k with a single subset) are skipped. The plain form is fitted on k < M only, since
    subsets from a pool of M have no spread at k = M; each R² is on the points its form was fitted to.
    """
    counts = _expert_counts(k)
    values = _losses(variance, counts.size, "variances")
    if pool_size < 1 or np.any(counts > pool_size):
        raise ConfigError(f"pool size M = {pool_size} is smaller than the largest k ({counts.max()}); "
                          "pass the number of experts subsets were drawn from")
    keep = np.isfinite(values)
    counts, values = counts[keep], values[keep]
    if np.any(values < 0):
        raise ConfigError("variances must be >= 0; pass squared standard deviations over subsets")
    below_pool = counts < pool_size
    if below_pool.sum() < 2:
        raise ConfigError("the variance law needs the spread at 2 or more expert counts below the pool size; "
                          "measure several subsets at each k")
    finite_x = 1 / counts - 1 / pool_size
    finite_c = _through_origin(finite_x, values)
    plain_x, plain_y = 1 / counts[below_pool], values[below_pool]
    plain_c = _through_origin(plain_x, plain_y)
    return VarianceLaw(pool_size, finite_c, _r_squared(values, finite_c * finite_x),
                       plain_c, _r_squared(plain_y, plain_c * plain_x))


def _through_origin(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.dot(x, y) / np.dot(x, x))


# ---------------------------------------------------------------------------------------------------------------
# Three-point forecast


def forecast_from_three_points(k: ArrayLike, loss: ArrayLike, *, pool_size: int | None = None,
                               offset_max: float = OFFSET_MAX) -> ThreePointForecast:
    """Fit L∞, A, b on the means at k = 1, 2, 4 only (3 points, 3 parameters) and predict every measured k.

    `pool_size` (M, default: the largest measured k) is where the relative error is reported.
    """
    _require_bound("offset_max", offset_max)
    summary = summarise_by_k(k, loss)
    missing = [anchor for anchor in THREE_POINT_K if anchor not in summary.k]
    if missing:
        raise ConfigError(f"the three-point forecast fits k = 1, 2, 4, but k = {missing} was not measured; "
                          "measure those subsets first")
    pool = int(summary.k.max()) if pool_size is None else pool_size
    if pool not in summary.k:
        raise ConfigError(f"k = {pool} (the pool size) was not measured, so the forecast cannot be checked there; "
                          "measure it or pass pool_size")
    anchors = np.isin(summary.k, THREE_POINT_K)
    params = _fit_law(summary.k[anchors], summary.mean[anchors], offset_max)
    predicted = params.loss(summary.k)
    at_pool = summary.k == pool
    measured_at_pool = float(summary.mean[at_pool][0])
    relative_error = (float(predicted[at_pool][0]) - measured_at_pool) / measured_at_pool
    return ThreePointForecast(params, summary.k, summary.mean, predicted, pool, relative_error)


# ---------------------------------------------------------------------------------------------------------------
# Joint fit over sizes


def fit_joint(n: ArrayLike, k: ArrayLike, loss: ArrayLike, *, offset_max: float = OFFSET_MAX,
              exponent_max: float = EXPONENT_MAX) -> JointFit:
    """Fit L(N, k) = L* + B·N^−β + A0·N^−γ/(k + b) to the per-(N, k) means; N in billions of parameters.

    Weighted least squares with weights ∝ k, all six parameters ≥ 0 (b ≤ `offset_max`, β, γ ≤ `exponent_max`),
    bounded trust region from a grid of (β, γ, b) starts, keeping the best. R² is unweighted, on the means.
    """
    _require_bound("offset_max", offset_max)
    _require_bound("exponent_max", exponent_max)
    counts = _expert_counts(k)
    sizes = np.asarray(n, dtype=float)
    if sizes.shape != counts.shape or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise ConfigError("base sizes N must be positive numbers (billions of parameters), one per measured subset")
    values = _losses(loss, counts.size)
    keep = _keep_finite(values)
    sizes, counts, values = sizes[keep], counts[keep], values[keep]
    distinct_sizes = np.unique(sizes).size
    if distinct_sizes < 2:
        raise ConfigError(f"the joint fit models how the floor and amplitude change with N, so it needs at least 2 "
                          f"distinct base sizes; got {distinct_sizes}: fit one size with fit_curve instead")
    _require_distinct_k(counts)
    if distinct_sizes == 2:
        logger.warning("joint fit on 2 base sizes: L*, B and β are not separately determined (only the floor at "
                       "those two sizes is); extrapolate in N with care")
    pairs, group, count = np.unique(np.column_stack([sizes, counts]), axis=0, return_inverse=True, return_counts=True)
    group = group.ravel()
    mean = np.bincount(group, weights=values) / count
    params = _fit_surface(pairs[:, 0], pairs[:, 1], mean, offset_max, exponent_max)
    r_squared = _r_squared(mean, params.loss(pairs[:, 0], pairs[:, 1]))
    return JointFit(params, r_squared, pairs[:, 0], pairs[:, 1].astype(int), mean, count)


def _fit_surface(n: np.ndarray, k: np.ndarray, mean: np.ndarray, offset_max: float,
                 exponent_max: float) -> JointParams:
    weights = np.sqrt(k)
    log_n = np.log(n)

    def terms(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return n ** -p[2], n ** -p[4] / (k + p[5]), 1 / (k + p[5])

    def residuals(p: np.ndarray) -> np.ndarray:
        floor_term, amplitude_term, _ = terms(p)
        return weights * (p[0] + p[1] * floor_term + p[3] * amplitude_term - mean)

    def jacobian(p: np.ndarray) -> np.ndarray:
        floor_term, amplitude_term, inverse = terms(p)
        columns = [np.ones_like(n), floor_term, -p[1] * floor_term * log_n,
                   amplitude_term, -p[3] * amplitude_term * log_n, -p[3] * amplitude_term * inverse]
        return weights[:, None] * np.column_stack(columns)

    # For fixed (β, γ, b) the law is linear in (L*, B, A0): each grid point gets its best non-negative values.
    starts = []
    for beta, gamma, b in product(_FLOOR_EXPONENT_STARTS, _AMPLITUDE_EXPONENT_STARTS, _JOINT_OFFSET_STARTS):
        beta, gamma, b = min(beta, exponent_max), min(gamma, exponent_max), min(b, offset_max)
        design = np.column_stack([np.ones_like(n), n**-beta, n**-gamma / (k + b)])
        floor_limit, floor_scale, amplitude_scale = _nonnegative_lstsq(design, mean, weights)
        starts.append([floor_limit, floor_scale, beta, amplitude_scale, gamma, b])
    upper = [np.inf, np.inf, exponent_max, np.inf, exponent_max, offset_max]
    best = _best_least_squares(residuals, jacobian, starts, [0.0] * 6, upper)
    return JointParams(*(float(v) for v in best))


# ---------------------------------------------------------------------------------------------------------------
# Planning


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
