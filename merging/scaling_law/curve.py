"""The per-method curve of the merging scaling law (arXiv 2509.24244): L(k) = L∞ + A/(k + b) at one base size.

- Fit of L(k) to the per-k means of subset losses, with bootstrap CIs.
- Three-point forecast: fit on k ∈ {1, 2, 4} only and predict the rest of the curve.

The input checks and least-squares helpers (underscored) serve the package's other fits too: variance, joint and
planning import them from here. Every fit is deterministic: start points come from a fixed grid, and the bootstrap
takes a seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import least_squares, nnls

from merging.errors import ConfigError

logger = logging.getLogger("mergeplan")

OFFSET_MAX = 100.0  # beyond this, A/(k + b) is a straight line over any realistic k, and A, b trade off freely
THREE_POINT_K = (1, 2, 4)
_OFFSET_STARTS = (0.0, 0.25, 1.0, 4.0, 16.0)
_SOLVER_TOLERANCES = {"ftol": 1e-12, "xtol": 1e-12, "gtol": 1e-12}


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


@dataclass(frozen=True, eq=False)
class ThreePointForecast:
    """A curve fitted on k = 1, 2, 4 alone, set against every measured mean."""

    params: CurveParams  # fitted on the means at k = 1, 2, 4 only
    k: np.ndarray  # every measured k
    measured: np.ndarray  # measured mean per k
    predicted: np.ndarray
    pool_size: int
    relative_error_at_pool: float  # (predicted − measured) / measured at k = pool_size; signed


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
