"""The joint fit over base sizes: L(N, k) = L* + B·N^−β + A0·N^−γ / (k + b), N in billions of parameters.

Deterministic like the per-size fit: start points come from a fixed grid of (β, γ, b).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import product

import numpy as np
from numpy.typing import ArrayLike

from merging.errors import ConfigError
from merging.scaling_law.curve import (
    OFFSET_MAX,
    CurveParams,
    _best_least_squares,
    _expert_counts,
    _keep_finite,
    _losses,
    _nonnegative_lstsq,
    _r_squared,
    _require_bound,
    _require_distinct_k,
)

logger = logging.getLogger("mergeplan")

EXPONENT_MAX = 4.0  # β, γ: the paper's fits lie in 0–0.5; the bound only keeps a flat direction from drifting
_JOINT_OFFSET_STARTS = (0.0, 0.5, 3.0)
_FLOOR_EXPONENT_STARTS = (0.1, 0.3, 0.6, 1.2)
_AMPLITUDE_EXPONENT_STARTS = (0.0, 0.15, 0.5)


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
