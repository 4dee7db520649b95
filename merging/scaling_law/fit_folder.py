"""Fit the merging scaling law to a sweep table, write the fit folder, and read it back (`load_fit`).

`fit_sweep` reads a table written by merging.sweep.run (or any table with its columns) and fits, for every size,
method and curve, L(k) = L∞ + A/(k + b), the variance law and the three-point forecast, with bootstrap CIs
for the macro curve (for every curve with `intervals="all"`: the bootstrap is most of the time a fit takes);
with two or more sizes, also the joint law over N. Curves (the `domain` of a fit):

- "macro": the macro cross-domain CE, i.e. per subset the mean CE over all evaluated domains;
- each evaluated domain: that domain's CE, averaged over all subsets of size k (those with and without the
  domain's own expert, as the spec asks: the ones that contain it rise with k).

The fit folder, written atomically (a hidden sibling folder renamed into place):

    fit.json        settings, sizes, and per size/method/domain: parameters, CIs, R², per-k points, forecast,
                    variance law, realised fractions (k80, k90); joint fits per method/domain
    summary.csv     one line per size/method/domain
    joint.csv       one line per method/domain with a joint fit (two or more sizes)
    bootstrap.npz   the bootstrap refits (floor, amplitude, offset), for the ± of a plan
    plots/SIZE/DOMAIN_{loss_vs_k,residuals,spread}.png, plots/DOMAIN_floor_vs_size_METHOD.png
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from merging.errors import ConfigError
from merging.io.checkpoint import staged_folder
from merging.scaling_law.curve import (
    OFFSET_MAX,
    CurveBootstrap,
    CurveFit,
    CurveParams,
    bootstrap_curve,
    fit_curve,
    forecast_from_three_points,
)
from merging.scaling_law.joint import JointFit, JointParams, fit_joint
from merging.scaling_law.planning import fitted_realisation, realisation
from merging.scaling_law.plots import plot_floor_vs_size, plot_loss_vs_experts, plot_residuals, plot_spread_vs_experts
from merging.scaling_law.sweep_curves import MACRO, Curve, SweepData, load_sweep
from merging.scaling_law.variance import VarianceLaw, fit_variance_law, subset_variance

log = logging.getLogger("mergeplan")

FIT_FORMAT = 1
FIT_FILE = "fit.json"
SUMMARY_FILE = "summary.csv"
JOINT_FILE = "joint.csv"
BOOTSTRAP_FILE = "bootstrap.npz"
PARAMETER_NAMES = ("floor", "amplitude", "offset")
JOINT_NAMES = ("floor_limit", "floor_scale", "floor_exponent", "amplitude_scale", "amplitude_exponent", "offset")


class FitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    resamples: int = Field(200, ge=2, description="bootstrap refits per curve")
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    domains: Literal["macro", "all"] = Field("all", description="fit the macro curve only, or each domain too")
    # the bootstrap refits each curve `resamples` times, most of a fit's time: domains get point fits by default
    intervals: Literal["macro", "all"] = Field("macro", description="bootstrap CIs for the macro curve, or all")
    plots: Literal["macro", "all"] = Field("macro", description="draw the macro curve only, or each domain too")
    offset_max: float = Field(OFFSET_MAX, ge=0)


@dataclass(frozen=True)
class FitReport:
    folder: Path
    summary: list[dict[str, Any]]  # the rows of summary.csv
    joint: list[dict[str, Any]]  # the rows of joint.csv


# ---------------------------------------------------------------------------------------------------------------
# Fitting


@dataclass
class _CurveResult:
    curve: Curve
    fit: CurveFit
    bootstrap: CurveBootstrap | None
    record: dict[str, Any]
    variance: VarianceLaw | None


def fit_sweep(sweep: str | Path, out: str | Path, settings: FitSettings | None = None, *,
              overwrite: bool = False) -> FitReport:
    """Fit every size/method/domain curve of a sweep table and write the fit folder `out` (see the module doc)."""
    settings = settings or FitSettings()
    sweep, out = Path(sweep), Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: fit folder exists; pass --overwrite or choose another")
    data = load_sweep(sweep)
    domains = [MACRO] + (data.domains if settings.domains == "all" else [])
    results = {key: _fit_one(curve, settings) for key, curve in sorted(data.curves.items(), key=_curve_order(data))
               if key[2] in domains}
    joints = _fit_joints(data, domains, settings)
    document = {
        "format": FIT_FORMAT, "sweep": str(sweep.resolve()), "settings": settings.model_dump(),
        "sizes": {info.name: {"n_params_b": info.n_params_b, "pool_size": info.pool_size} for info in data.sizes},
        "methods": data.methods, "domains": domains,
        "curves": _nested({key: result.record for key, result in results.items()}),
        "joint": {method: {domain: record for (m, domain), (_, record) in joints.items() if m == method}
                  for method in data.methods if any(m == method for m, _ in joints)},
    }
    summary = [_summary_row(result) for result in results.values()]
    joint_rows = [{"method": method, "domain": domain, **record["params"], "r_squared": record["r_squared"],
                   **{f"floor_at_{size}": floor for size, floor in record["floor_by_size"].items()},
                   "floor_decreasing_in_n": record["floor_decreasing_in_n"]}
                  for (method, domain), (_, record) in joints.items()]
    with staged_folder(out, overwrite) as staging:
        (staging / FIT_FILE).write_text(json.dumps(_json_safe(document), indent=2) + "\n")
        _write_csv(staging / SUMMARY_FILE, summary)
        if joint_rows:
            _write_csv(staging / JOINT_FILE, joint_rows)
        np.savez(staging / BOOTSTRAP_FILE, **{_bootstrap_key(*key): result.bootstrap.samples
                                              for key, result in results.items() if result.bootstrap is not None})
        _draw(staging / "plots", data, results, joints, settings)
    return FitReport(out, summary, joint_rows)


def _curve_order(data: SweepData) -> Callable[[tuple[tuple[str, str, str], Curve]], tuple[int, int, int]]:
    """Sort key of the curves: sizes by N, methods as in the table, the macro curve before the domains."""
    sizes = {info.name: i for i, info in enumerate(data.sizes)}
    methods = {method: i for i, method in enumerate(data.methods)}
    domains = {domain: i for i, domain in enumerate([MACRO, *data.domains])}
    return lambda item: (sizes[item[0][0]], methods[item[0][1]], domains[item[0][2]])


@contextmanager
def _log_prefix(prefix: str) -> Iterator[None]:
    """Prefix the library's log lines (e.g. scaling_law's warning that b hit its bound) with the curve they are
    about, so that a warning among forty fits says which one."""
    def add_prefix(record: logging.LogRecord) -> bool:
        record.msg = f"{prefix}: {record.msg}"
        return True

    log.addFilter(add_prefix)
    try:
        yield
    finally:
        log.removeFilter(add_prefix)


def _fit_one(curve: Curve, settings: FitSettings) -> _CurveResult:
    where = f"size {curve.size.name}, method {curve.method}, {curve.domain}"
    try:
        with _log_prefix(where):
            fit = fit_curve(curve.k, curve.loss, offset_max=settings.offset_max)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    pool = curve.size.pool_size
    if curve.domain == MACRO or settings.intervals == "all":
        bootstrap, bootstrap_note = _optional(lambda: bootstrap_curve(
            fit, resamples=settings.resamples, confidence=settings.confidence, seed=settings.seed))
    else:
        bootstrap, bootstrap_note = None, {"skipped": "no bootstrap for domain curves (fit with --intervals all)"}
    variance, variance_note = _optional(lambda: fit_variance_law(fit.summary.k, subset_variance(fit.summary, pool),
                                                                 pool))
    forecast, forecast_note = _optional(lambda: forecast_from_three_points(curve.k, curve.loss, pool_size=pool,
                                                                           offset_max=settings.offset_max))
    measured, measured_note = _optional(lambda: realisation(fit.summary.k, fit.summary.mean))
    fitted, fitted_note = _optional(lambda: fitted_realisation(fit.params, pool))
    record = {
        "params": _params(fit.params),
        "ci": None if bootstrap is None else {name: [getattr(bootstrap.low, name), getattr(bootstrap.high, name)]
                                              for name in PARAMETER_NAMES},
        "ci_skipped": bootstrap_note,
        "r_squared": fit.r_squared,
        "points": {"k": fit.summary.k.tolist(), "mean": fit.summary.mean.tolist(), "std": fit.summary.std.tolist(),
                   "count": fit.summary.count.tolist(), "residual": fit.residuals.tolist()},
        "forecast": forecast_note if forecast is None else {
            "params": _params(forecast.params), "predicted": forecast.predicted.tolist(),
            "pool_size": forecast.pool_size, "relative_error_at_pool": forecast.relative_error_at_pool},
        "variance": variance_note if variance is None else {
            "pool_size": variance.pool_size, "variance": subset_variance(fit.summary, pool).tolist(),
            "finite_pool_constant": variance.finite_pool_constant,
            "finite_pool_r_squared": variance.finite_pool_r_squared,
            "plain_constant": variance.plain_constant, "plain_r_squared": variance.plain_r_squared},
        "realisation": {
            "measured": measured_note if measured is None else {"k80": measured.k80, "k90": measured.k90,
                                                                "fraction": measured.fraction.tolist()},
            "fitted": fitted_note if fitted is None else {"k80": fitted.k80, "k90": fitted.k90}},
    }
    return _CurveResult(curve, fit, bootstrap, record, variance)


def _optional(compute):
    """(result, None), or (None, {"skipped": reason}) when the data cannot support this part of the fit."""
    try:
        return compute(), None
    except ConfigError as exc:
        return None, {"skipped": str(exc)}


def _params(params: CurveParams) -> dict[str, float]:
    return {name: getattr(params, name) for name in PARAMETER_NAMES}


def _fit_joints(data: SweepData, domains: list[str],
                settings: FitSettings) -> dict[tuple[str, str], tuple[JointFit, dict[str, Any]]]:
    if len(data.sizes) < 2:
        return {}
    joints = {}
    for method in data.methods:
        for domain in domains:
            curves = [data.curves[(info.name, method, domain)] for info in data.sizes
                      if (info.name, method, domain) in data.curves]
            if len(curves) < 2:
                continue
            n = np.concatenate([np.full(curve.k.size, curve.size.n_params_b) for curve in curves])
            try:
                joint = fit_joint(n, np.concatenate([c.k for c in curves]), np.concatenate([c.loss for c in curves]),
                                  offset_max=settings.offset_max)
            except ConfigError as exc:
                raise ConfigError(f"joint fit of {method}, {domain}: {exc}") from exc
            floors = {curve.size.name: float(joint.params.floor(curve.size.n_params_b)) for curve in curves}
            joints[(method, domain)] = (joint, {
                "params": {name: getattr(joint.params, name) for name in JOINT_NAMES},
                "r_squared": joint.r_squared, "floor_by_size": floors,
                "floor_decreasing_in_n": bool(np.all(np.diff(list(floors.values())) < 0))})
    return joints


def _nested(records: dict[tuple[str, str, str], dict]) -> dict[str, dict[str, dict[str, dict]]]:
    nested: dict[str, dict[str, dict[str, dict]]] = {}
    for (size, method, domain), record in records.items():
        nested.setdefault(size, {}).setdefault(method, {})[domain] = record
    return nested


def _summary_row(result: _CurveResult) -> dict[str, Any]:
    record, curve = result.record, result.curve
    row = {"size": curve.size.name, "n_params_b": curve.size.n_params_b, "pool_size": curve.size.pool_size,
           "method": curve.method, "domain": curve.domain, **record["params"], "r_squared": record["r_squared"]}
    for name in PARAMETER_NAMES:
        low, high = record["ci"][name] if record["ci"] else (None, None)
        row |= {f"{name}_low": low, f"{name}_high": high}
    forecast, fitted = record["forecast"], record["realisation"]["fitted"]
    row["forecast_relative_error"] = forecast.get("relative_error_at_pool")
    row["k80"], row["k90"] = fitted.get("k80"), fitted.get("k90")
    std = dict(zip(result.fit.summary.k.tolist(), result.fit.summary.std.tolist(), strict=True))
    row["std_at_k1"] = std.get(1)
    row["std_below_pool"] = std.get(curve.size.pool_size - 1)
    row["variance_r_squared"] = record["variance"].get("finite_pool_r_squared")
    return row


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{key: _cell(value) for key, value in row.items()} for row in rows])


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def _json_safe(value: Any) -> Any:
    """NaN (e.g. the spread at a k measured once) as null: JSON has no NaN."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def _bootstrap_key(size: str, method: str, domain: str) -> str:
    return f"{size}/{method}/{domain}"


def _draw(folder: Path, data: SweepData, results: dict[tuple[str, str, str], _CurveResult],
          joints: dict[tuple[str, str], tuple[JointFit, dict]], settings: FitSettings) -> None:
    drawn = [MACRO] + (data.domains if settings.plots == "all" else [])
    for info in data.sizes:
        for domain in drawn:
            chosen = {method: results[(info.name, method, domain)] for method in data.methods
                      if (info.name, method, domain) in results}
            if not chosen:
                continue
            fits = {method: result.fit for method, result in chosen.items()}
            title = f"{info.name} ({info.n_params_b:.3g}B), {domain}"
            bootstraps = {method: r.bootstrap for method, r in chosen.items() if r.bootstrap is not None}
            laws = {method: r.variance for method, r in chosen.items() if r.variance is not None}
            plot_loss_vs_experts(fits, folder / info.name / f"{domain}_loss_vs_k.png", bootstraps=bootstraps,
                                 title=f"CE vs experts merged: {title}")
            plot_residuals(fits, folder / info.name / f"{domain}_residuals.png", title=f"residuals: {title}")
            plot_spread_vs_experts(fits, laws, folder / info.name / f"{domain}_spread.png",
                                   title=f"spread over subsets: {title}")
    for (method, domain), (joint, record) in joints.items():
        if domain in drawn:
            per_size = {data.sizes[i].n_params_b: results[(info.name, method, domain)].fit.params.floor
                        for i, info in enumerate(data.sizes) if (info.name, method, domain) in results}
            plot_floor_vs_size(joint, folder / f"{domain}_floor_vs_size_{method}.png", per_size_floors=per_size,
                               title=f"floor vs base size: {method}, {domain} (R² {record['r_squared']:.3f})")


# ---------------------------------------------------------------------------------------------------------------
# Reading a fit folder


@dataclass
class FitFolder:
    folder: Path
    document: dict[str, Any]
    bootstraps: dict[str, np.ndarray]

    @property
    def sizes(self) -> dict[str, dict[str, Any]]:
        return self.document["sizes"]

    def curve(self, size: str, method: str, domain: str) -> dict[str, Any]:
        by_method = self.document["curves"].get(size)
        if by_method is None:
            raise ConfigError(f"{self.folder / FIT_FILE}: no size {size!r}; sizes are {', '.join(self.sizes)}")
        if method not in by_method:
            raise ConfigError(f"{self.folder / FIT_FILE}: no method {method!r} at size {size}; "
                              f"methods are {', '.join(by_method)}")
        if domain not in by_method[method]:
            raise ConfigError(f"{self.folder / FIT_FILE}: no curve for domain {domain!r}; "
                              f"domains are {', '.join(by_method[method])}")
        return by_method[method][domain]

    def bootstrap(self, size: str, method: str, domain: str) -> CurveBootstrap | None:
        samples = self.bootstraps.get(_bootstrap_key(size, method, domain))
        record = self.curve(size, method, domain)
        if samples is None or record["ci"] is None:
            return None
        low = CurveParams(*(record["ci"][name][0] for name in PARAMETER_NAMES))
        high = CurveParams(*(record["ci"][name][1] for name in PARAMETER_NAMES))
        return CurveBootstrap(samples, self.document["settings"]["confidence"], low, high)

    def joint(self, method: str, domain: str) -> JointParams | None:
        record = self.document["joint"].get(method, {}).get(domain)
        return None if record is None else JointParams(**record["params"])


def load_fit(folder: str | Path) -> FitFolder:
    folder = Path(folder)
    path = folder / FIT_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: no {FIT_FILE}; write one with mergeplan fit SWEEP --out {folder}")
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as JSON ({exc}); fit the sweep again") from exc
    if not isinstance(document, dict) or document.get("format") != FIT_FORMAT:
        raise ConfigError(f"{path}: not a mergeplan fit (format {FIT_FORMAT}); fit the sweep again")
    bootstrap_path = folder / BOOTSTRAP_FILE
    bootstraps = {}
    if bootstrap_path.is_file():
        with np.load(bootstrap_path) as archive:
            bootstraps = {key: archive[key] for key in archive.files}
    return FitFolder(folder, document, bootstraps)
