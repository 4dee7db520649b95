"""The spread of the subset losses over subsets of size k from a pool of M experts: Var(k) = c·(1/k − 1/M)
(the finite-pool law) against the plain Var(k) = c/k."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from merging.errors import ConfigError
from merging.scaling_law.curve import KSummary, _expert_counts, _losses, _r_squared


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
