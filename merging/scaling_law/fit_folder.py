"""Fit the merging scaling law to a sweep table, write the fit folder, and plan from it.

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

`plan_from_fit` answers "how many experts" in one sentence per method from a fit folder.
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
    JointFit,
    JointParams,
    VarianceLaw,
    bootstrap_curve,
    experts_for_target,
    fit_curve,
    fit_joint,
    fit_variance_law,
    fitted_realisation,
    forecast_from_three_points,
    plan,
    realisation,
    size_or_experts,
    subset_variance,
)
from merging.scaling_law.decision import DecisionRule
from merging.scaling_law.plots import plot_floor_vs_size, plot_loss_vs_experts, plot_residuals, plot_spread_vs_experts
from merging.sweep.run import read_table

log = logging.getLogger("mergeplan")

MACRO = "macro"
RECOMMENDATION = "recommended"  # the PlanLine that compares the methods
FIT_FORMAT = 1
FIT_FILE = "fit.json"
SUMMARY_FILE = "summary.csv"
JOINT_FILE = "joint.csv"
BOOTSTRAP_FILE = "bootstrap.npz"
FIT_COLUMNS = ("size", "n_params_b", "method", "k", "subset", "domain", "ce")
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
class SizeInfo:
    name: str
    n_params_b: float
    pool_size: int


@dataclass(frozen=True)
class Curve:
    """The subset losses of one size, method and domain: one (k, loss) per subset."""

    size: SizeInfo
    method: str
    domain: str
    k: np.ndarray
    loss: np.ndarray


@dataclass
class SweepData:
    sizes: list[SizeInfo]  # by parameter count
    methods: list[str]  # in table order
    domains: list[str]  # evaluated domains, sorted; the curves are MACRO then these
    curves: dict[tuple[str, str, str], Curve]  # (size, method, domain)


@dataclass(frozen=True)
class FitReport:
    folder: Path
    summary: list[dict[str, Any]]  # the rows of summary.csv
    joint: list[dict[str, Any]]  # the rows of joint.csv


# ---------------------------------------------------------------------------------------------------------------
# Reading a sweep


def load_sweep(path: str | Path) -> SweepData:
    """The curves of a sweep table; NaN losses are dropped (one warning with their count)."""
    path = Path(path)
    columns = read_table(path, FIT_COLUMNS)
    rows = list(zip(*(columns[name] for name in FIT_COLUMNS), strict=True))
    if not rows:
        raise ConfigError(f"{path}: the table has no rows; run (or finish) the sweep first")
    finite = [row for row in rows if row[6] is not None and math.isfinite(row[6])]
    if len(finite) < len(rows):
        log.warning("%s: dropped %d of %d rows with a NaN or infinite ce", path, len(rows) - len(finite), len(rows))
    if any(row[i] is None for row in finite for i in range(6)):
        raise ConfigError(f"{path}: empty cells in the columns {', '.join(FIT_COLUMNS[:6])}; fill or drop those rows")
    pool_sizes = _pool_sizes(columns, rows)
    losses: dict[tuple[str, str, str], dict[str, float]] = {}  # (size, method, subset) -> domain -> ce
    subset_k: dict[tuple[str, str, str], int] = {}
    n_params: dict[str, float] = {}
    for size, n_params_b, method, k, subset, domain, ce in finite:
        key = (size, method, subset)
        if domain in losses.setdefault(key, {}):
            raise ConfigError(f"{path}: two rows for size {size}, method {method}, subset {subset}, domain {domain}; "
                              "remove the duplicate")
        losses[key][domain] = ce
        subset_k[key] = k
        n_params[size] = n_params_b
    sizes = sorted((SizeInfo(size, n_params[size], pool_sizes[size]) for size in n_params),
                   key=lambda info: info.n_params_b)
    methods = list(dict.fromkeys(method for _, method, _ in losses))
    domains = sorted({domain for by_domain in losses.values() for domain in by_domain})
    if MACRO in domains:
        raise ConfigError(f"{path}: a domain is named {MACRO!r}, the name of the mean over domains; rename it")
    curves = _curves(path, sizes, methods, domains, losses, subset_k)
    return SweepData(sizes, methods, domains, curves)


def _pool_sizes(columns: dict[str, list], rows: list[tuple]) -> dict[str, int]:
    """M per size: the pool_size column where the table has it, otherwise the largest k measured."""
    largest_k: dict[str, int] = {}
    recorded: dict[str, int] = {}
    for row, pool in zip(rows, columns.get("pool_size", [None] * len(rows)), strict=True):
        largest_k[row[0]] = max(largest_k.get(row[0], 0), row[3])
        if pool is not None:
            recorded[row[0]] = max(recorded.get(row[0], 0), pool)
    return largest_k | recorded


def _curves(path: Path, sizes: list[SizeInfo], methods: list[str], domains: list[str],
            losses: dict[tuple[str, str, str], dict[str, float]],
            subset_k: dict[tuple[str, str, str], int]) -> dict[tuple[str, str, str], Curve]:
    by_name = {info.name: info for info in sizes}
    points: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    incomplete = 0
    for (size, method, subset), by_domain in losses.items():
        k = subset_k[(size, method, subset)]
        for domain, ce in by_domain.items():
            points.setdefault((size, method, domain), []).append((k, ce))
        if len(by_domain) == len(domains):
            points.setdefault((size, method, MACRO), []).append((k, float(np.mean(list(by_domain.values())))))
        else:
            incomplete += 1
    if incomplete:
        log.warning("%s: %d subsets lack some domains' CE (NaN or missing rows): left out of the macro curves",
                    path, incomplete)
    return {key: Curve(by_name[key[0]], key[1], key[2], np.array([k for k, _ in values]),
                       np.array([loss for _, loss in values]))
            for key, values in points.items()}


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
# Planning


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
