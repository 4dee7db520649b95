"""Scaling-law figures as PNG files: loss vs experts, residuals, spread vs experts, floor vs base size, and the
methods of an experiment's merging runs side by side.

Figures are drawn with matplotlib's object API on an Agg canvas, not pyplot, so nothing depends on (or changes)
the global backend and no figure outlives its function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from merging.errors import ConfigError
from merging.scaling_law.curve import CurveBootstrap, CurveFit
from merging.scaling_law.joint import JointFit
from merging.scaling_law.variance import VarianceLaw, subset_variance

_GRID_POINTS = 200


def plot_loss_vs_experts(fits: Mapping[str, CurveFit], path: str | Path, *,
                         bootstraps: Mapping[str, CurveBootstrap] | None = None,
                         newest: tuple[int, float] | None = None,
                         title: str = "merged-model loss vs number of experts") -> Path:
    """One line per method: raw subset losses, per-k means, the fitted law and (when given) its bootstrap band;
    `newest` (k, loss) is marked: the point the run that drew it measured."""
    _require_some(fits)
    figure, axes = _figure()
    for colour, (method, fit) in zip(_colours(len(fits)), fits.items(), strict=True):
        # with the newest point marked, the curve and band reach one expert further: the next arrival's forecast
        grid = np.linspace(fit.summary.k.min(), fit.summary.k.max() + (newest is not None), _GRID_POINTS)
        axes.scatter(fit.subset_k, fit.subset_loss, s=6, alpha=0.25, color=colour)
        axes.plot(fit.summary.k, fit.summary.mean, "o", color=colour)
        p = fit.params
        label = f"{method}: {p.floor:.3f} + {p.amplitude:.3f}/(k + {p.offset:.2f}), R² {fit.r_squared:.3f}"
        axes.plot(grid, p.loss(grid), "-", color=colour, label=label)
        if bootstraps and method in bootstraps:
            low, high = bootstraps[method].prediction_band(grid)
            axes.fill_between(grid, low, high, color=colour, alpha=0.2, linewidth=0,
                              label=f"{100 * bootstraps[method].confidence:g}% band")
    if newest is not None:
        axes.plot(*newest, "D", color="black", markersize=8, label=f"this run: k = {newest[0]}, {newest[1]:.4f}")
    axes.set_xlabel("experts merged, k")
    axes.set_ylabel("held-out CE (nats/token)")
    return _save(figure, axes, title, path)


def plot_residuals(fits: Mapping[str, CurveFit], path: str | Path, *,
                   title: str = "residuals of the fitted law (mean - fit)") -> Path:
    _require_some(fits)
    figure, axes = _figure()
    for colour, (method, fit) in zip(_colours(len(fits)), fits.items(), strict=True):
        axes.plot(fit.summary.k, fit.residuals, "o-", color=colour, label=method)
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set_xlabel("experts merged, k")
    axes.set_ylabel("residual (nats/token)")
    return _save(figure, axes, title, path)


def plot_spread_vs_experts(fits: Mapping[str, CurveFit], laws: Mapping[str, VarianceLaw], path: str | Path, *,
                           title: str = "spread over subsets vs number of experts") -> Path:
    """Standard deviation over subsets per k, with the square root of each fitted variance law (from `laws`)."""
    _require_some(fits)
    figure, axes = _figure()
    for colour, (method, fit) in zip(_colours(len(fits)), fits.items(), strict=True):
        law = laws.get(method)
        # the law was fitted to subset_variance (population variance where every subset was measured), so the
        # points are drawn the same way
        spread = fit.summary.std if law is None else np.sqrt(subset_variance(fit.summary, law.pool_size))
        axes.plot(fit.summary.k, spread, "o", color=colour, label=f"{method}: measured")
        if law is not None:
            grid = np.linspace(1, law.pool_size, _GRID_POINTS)
            axes.plot(grid, np.sqrt(np.maximum(law.finite_pool_variance(grid), 0)), "-", color=colour,
                      label=f"c(1/k - 1/{law.pool_size}), R² {law.finite_pool_r_squared:.3f}")
            axes.plot(grid, np.sqrt(law.plain_variance(grid)), ":", color=colour,
                      label=f"c/k, R² {law.plain_r_squared:.3f}")
    axes.set_xlabel("experts merged, k")
    axes.set_ylabel("std of CE over subsets (nats/token)")
    return _save(figure, axes, title, path)


def plot_floor_vs_size(joint: JointFit, path: str | Path, *, per_size_floors: Mapping[float, float] | None = None,
                       title: str = "loss floor vs base size") -> Path:
    """The joint fit's floor L* + B·N^−β over the measured sizes; per-size fitted floors as points when given."""
    figure, axes = _figure()
    grid = np.geomspace(joint.n.min(), joint.n.max(), _GRID_POINTS)
    p = joint.params
    axes.plot(grid, p.floor(grid), "-", label=f"{p.floor_limit:.3f} + {p.floor_scale:.3f}·N^-{p.floor_exponent:.2f}")
    axes.axhline(p.floor_limit, color="grey", linestyle=":", label="L* (N → ∞)")
    if per_size_floors:
        sizes = sorted(per_size_floors)
        axes.plot(sizes, [per_size_floors[s] for s in sizes], "o", label="per-size fits")
    axes.set_xscale("log")
    plain_numbers = FuncFormatter(lambda value, _: f"{value:g}")  # 0.5, 7 rather than 5x10^-1, 7x10^0
    axes.xaxis.set_major_formatter(plain_numbers)
    axes.xaxis.set_minor_formatter(plain_numbers)
    axes.set_xlabel("base size N (billions of parameters)")
    axes.set_ylabel("floor L∞ (nats/token)")
    return _save(figure, axes, title, path)


def plot_methods(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | Path, *,
                 champion: tuple[int, float] | None = None,
                 title: str = "merging runs of this experiment, by method") -> Path:
    """One line per method through its merged models' (k, loss), ordered by k; the champion starred."""
    if not curves:
        raise ConfigError("nothing to plot: no merged model has a loss yet")
    figure, axes = _figure()
    for colour, (method, points) in zip(_colours(len(curves)), curves.items(), strict=True):
        ks, losses = zip(*sorted(points), strict=True)
        best = min(losses)
        axes.plot(ks, losses, "o-", color=colour, label=f"{method}: best {best:.4f} at k = {ks[losses.index(best)]}")
    if champion is not None:
        axes.plot(*champion, "*", color="black", markersize=14, label=f"champion {champion[1]:.4f}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("experts merged, k")
    axes.set_ylabel("held-out macro CE (nats/token)")
    return _save(figure, axes, title, path)


def _require_some(fits: Mapping[str, CurveFit]) -> None:
    if not fits:
        raise ConfigError("nothing to plot: pass at least one fitted curve")


def _figure() -> tuple[Figure, Axes]:
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _colours(count: int) -> list[str]:
    return [f"C{i % 10}" for i in range(count)]


def _save(figure: Figure, axes: Axes, title: str, path: str | Path) -> Path:
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=120)
    return target
