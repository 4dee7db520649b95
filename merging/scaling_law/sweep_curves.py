"""A sweep table read into curves: per size, method and domain, the (k, loss) of every measured subset.

The domains of a curve are each evaluated domain and "macro", per subset the mean CE over all evaluated domains.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from merging.errors import ConfigError
from merging.sweep.table import read_table

log = logging.getLogger("mergeplan")

MACRO = "macro"
FIT_COLUMNS = ("size", "n_params_b", "method", "k", "subset", "domain", "ce")


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
