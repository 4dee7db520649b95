"""The sweep run: expert-subset merges of each size, evaluated per domain, for the merging scaling law.

For every size family, every method and every subset of a design (merging.sweep.designs), the subset's experts
are merged into a model loaded once per size (weights swapped in place, no checkpoint written: see
merging.sweep.task_vectors) and its response-only CE is measured on each domain's eval split; one row per
(size, method, k, subset, domain) goes to the table (merging.sweep.table).

With `workers` > 1, subsets are spread over that many spawned processes (one torch thread each), each holding
its own copy of the size's model and task vectors.

The table is written atomically (temporary file, then rename) every `flush_seconds` and at the end, also when
the sweep is interrupted; started again with the same output, a sweep skips the (size, method, subset) groups
already there.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from merging.data.loading import data_domains, load_split
from merging.errors import ConfigError
from merging.evaluate import cross_entropy, load_for_evaluation
from merging.methods import MergeMethod, build_method
from merging.progress_bar import progress_bar
from merging.sweep.designs import Design, Subset, design_subsets
from merging.sweep.table import SUBSET_SEPARATOR, Row, read_table, rows_by_group, table_format, write_table
from merging.sweep.task_vectors import TaskVectors, model_targets
from merging.zoo.layout import SizeFamily

log = logging.getLogger("mergeplan")

# The paper's variants (spec: TA is θ0 + 0.8·mean(τ); TIES and DARE keep 20 % of each task vector at λ = 1).
DEFAULT_METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "average": {},
    "task_arithmetic": {"lambda": 0.8, "normalize": True},
    "ties": {"density": 0.2, "lambda": 1.0},
    "dare_ties": {"density": 0.2, "lambda": 1.0},
}
DEFAULT_METHODS = tuple(DEFAULT_METHOD_PARAMS)


class SweepSettings(BaseModel):
    """What a sweep measures and how. The rows record design, seed, eval_examples and each method's params (as
    JSON), and a resumed sweep must match them; batch_size, flush_seconds and workers do not change what is
    measured (beyond float rounding: CE summed by another number of threads can differ in its last bits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    methods: tuple[str, ...] = Field(DEFAULT_METHODS, min_length=1)
    params: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                              description="per method: params replacing its defaults")
    design: Design = "all"
    max_subsets: int | None = Field(None, ge=1, description="subsets per k at most (all, diverse)")
    eval_examples: int = Field(64, ge=1, description="eval examples per domain")
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    flush_seconds: float = Field(30.0, ge=0, description="write the table at most this often while sweeping")
    workers: int = Field(1, ge=1, description="processes merging and evaluating subsets in parallel, 1 thread each")
    ks: tuple[int, ...] | None = Field(None, description="only these expert counts (default every k = 1 … M)")

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, ks: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if ks is not None and (not ks or min(ks) < 1):
            raise ValueError("give at least one k, each >= 1")
        return ks

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        twice = [method for method in methods if methods.count(method) > 1]
        if twice:
            raise ValueError(f"{twice[0]} is listed twice; name each method once")
        return methods

    def method_params(self, method: str) -> dict[str, Any]:
        return {**DEFAULT_METHOD_PARAMS.get(method, {}), **self.params.get(method, {})}


def parse_method_params(assignments: list[str]) -> dict[str, dict[str, Any]]:
    """METHOD.FIELD=VALUE strings (the CLI's --param) as {method: {field: value}}; values are YAML scalars."""
    params: dict[str, dict[str, Any]] = {}
    for assignment in assignments:
        name, _, value = assignment.partition("=")
        method, _, field = name.partition(".")
        if not (method and field and value):
            raise ConfigError(f"--param: expected METHOD.FIELD=VALUE (e.g. ties.lambda=0.5), got {assignment!r}")
        params.setdefault(method, {})[field] = yaml.safe_load(value)
    return params


@dataclass(frozen=True)
class Group:
    """One merged model of the sweep: a subset of one size's experts merged by one method."""

    family: SizeFamily
    method: str
    k: int
    subset: Subset

    @property
    def label(self) -> str:
        """The subset as the table writes it: its experts' names joined by SUBSET_SEPARATOR."""
        return SUBSET_SEPARATOR.join(self.family.expert_names[i] for i in self.subset)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.family.name, self.method, self.label


@dataclass(frozen=True)
class SweepProgress:
    done: int  # groups in the table now, including those found there at the start
    total: int
    computed: int  # groups merged and evaluated by this run
    group: Group
    seconds: float  # since this run started


@dataclass(frozen=True)
class SweepReport:
    path: Path
    groups: int
    computed: int  # merged and evaluated by this run
    skipped: int  # already in the table when the run started
    seconds: float

    @property
    def models_per_minute(self) -> float:
        return 60 * self.computed / self.seconds if self.seconds > 0 else float("nan")


def planned_merges(pool_size: int, settings: SweepSettings) -> list[tuple[str, int, Subset]]:
    """Every (method, k, subset) a sweep of a pool of POOL_SIZE experts measures, in order: methods as given, k
    ascending, the design's subsets in its order."""
    designs = design_subsets(settings.design, pool_size, settings.max_subsets, settings.seed)
    return [(method, k, subset) for method in settings.methods for k, subsets in designs.items()
            if settings.ks is None or k in settings.ks for subset in subsets]


def sweep_groups(families: list[SizeFamily], settings: SweepSettings) -> list[Group]:
    """Every (size, method, subset) to measure, in order: sizes as given, then as planned_merges orders them."""
    return [Group(family, method, k, subset) for family in families
            for method, k, subset in planned_merges(len(family.experts), settings)]


class _Sweep:
    """State of one run: the rows kept so far (by group) and when they were last written."""

    def __init__(self, out: Path, groups: list[Group], settings: SweepSettings, domains: list[str],
                 progress: Callable[[SweepProgress], None] | None):
        self.out, self.groups, self.settings, self.progress = out, groups, settings, progress
        self.domains = sorted(domains)
        self.order = {group.key: position for position, group in enumerate(groups)}
        self.rows, self.foreign = self._resume()
        self.skipped = len(self.rows)
        self.computed = 0
        self.started = self.last_flush = time.perf_counter()
        self.unflushed = False

    def _resume(self) -> tuple[dict[tuple[str, str, str], list[Row]], list[Row]]:
        """Finished groups of this sweep found in the output, and rows of other sizes or methods (kept as they are)."""
        if not self.out.exists():
            return {}, []
        groups = rows_by_group(read_table(self.out))
        self._check_settings(groups)
        rows, foreign = {}, []
        swept_pairs = {(group.family.name, group.method) for group in self.groups}
        for key, group_rows in groups.items():
            if key in self.order:
                rows[key] = group_rows
            elif key[:2] in swept_pairs:
                raise ConfigError(f"{self.out}: has subset {key[2]} of {key[1]} at size {key[0]}, which this design "
                                  "does not measure; resume with the settings it was written with or use a new --out")
            else:
                foreign += group_rows
        # a group missing a domain (a table cut short by hand) is measured again
        complete = {key: group_rows for key, group_rows in rows.items()
                    if sorted(row["domain"] for row in group_rows) == self.domains}
        if rows:
            log.info("resuming %s: %d of %d subsets already measured", self.out, len(complete), len(self.groups))
        return complete, foreign

    def _check_settings(self, groups: dict[tuple[str, str, str], list[Row]]) -> None:
        expected = {"design": self.settings.design, "seed": self.settings.seed,
                    "eval_examples": self.settings.eval_examples}
        for group_rows in groups.values():
            row = group_rows[0]
            method = row["method"]
            for field, value in expected.items():
                if row[field] != value:
                    raise ConfigError(f"{self.out}: was written with {field} {row[field]}, this run has {value}; "
                                      "resume with the same settings or use a new --out")
            if method in self.settings.methods and row["method_params"] != _params_json(self.settings, method):
                raise ConfigError(f"{self.out}: {method} was measured with params {row['method_params']}, this run "
                                  f"has {_params_json(self.settings, method)}; use the same params or a new --out")

    def finished(self, group: Group) -> bool:
        return group.key in self.rows

    def record(self, group: Group, rows: list[Row]) -> None:
        self.rows[group.key] = rows
        self.computed += 1
        self.unflushed = True
        now = time.perf_counter()
        if now - self.last_flush >= self.settings.flush_seconds:
            self.flush()
            log.info("sweep: %d/%d subsets, %.1f merged models per minute", len(self.rows), len(self.groups),
                     60 * self.computed / (now - self.started))
        if self.progress is not None:
            self.progress(SweepProgress(len(self.rows), len(self.groups), self.computed, group, now - self.started))

    def flush(self) -> None:
        if self.unflushed or not self.out.exists():
            ordered = sorted(self.rows.items(), key=lambda item: self.order[item[0]])
            write_table([row for _, rows in ordered for row in rows] + self.foreign, self.out)
        self.unflushed = False
        self.last_flush = time.perf_counter()


def _params_json(settings: SweepSettings, method: str) -> str:
    return json.dumps(settings.method_params(method), sort_keys=True)


def check_sweep(out: str | Path, settings: SweepSettings) -> None:
    """Refuse an output that is not a table file, and methods or params a sweep cannot run, before any model (or
    zoo folder: call this first) is read."""
    table_format(Path(out))
    for name in settings.methods:
        method = build_method(name, settings.method_params(name), settings.seed, source=f"sweep.{name}")
        if not isinstance(method, MergeMethod):
            raise ConfigError(f"sweep.{name}: {name} reads every expert's tensor at once, so a sweep cannot fold "
                              "prefixes of experts with it; sweep a fold method")
        if method.min_experts > 1 or method.max_experts is not None:
            raise ConfigError(f"sweep.{name}: a sweep merges subsets of every size from one expert up, which {name} "
                              "does not take; sweep another method")


def run_sweep(families: list[SizeFamily], data: str | Path, out: str | Path, settings: SweepSettings | None = None,
              progress: Callable[[SweepProgress], None] | None = None) -> SweepReport:
    """Measure every subset of the design for every size family and method on the eval splits of the data folder
    `data`; rows go to `out` (.parquet/.csv), sizes in the order of `families`.

    `progress` is called after each merged and evaluated subset. Groups already in `out` are skipped.
    """
    settings = settings or SweepSettings()
    data, out = Path(data), Path(out)
    check_sweep(out, settings)
    groups = sweep_groups(families, settings)
    sweep = _Sweep(out, groups, settings, data_domains(data), progress)
    try:
        for family in families:
            remaining = [group for group in groups if group.family == family and not sweep.finished(group)]
            for group, rows in progress_bar(_measure(family, remaining, data, settings), f"sweep {family.name}",
                                            "subset", total=len(remaining)):
                sweep.record(group, rows)
    finally:
        sweep.flush()
    seconds = time.perf_counter() - sweep.started
    return SweepReport(out, len(groups), sweep.computed, sweep.skipped, seconds)


def _measure(family: SizeFamily, groups: list[Group], data: Path,
             settings: SweepSettings) -> Iterator[tuple[Group, list[Row]]]:
    """Each group with its rows, in order: in this process, or spread over `settings.workers` processes."""
    if not groups:
        return
    if settings.workers == 1:
        evaluator = FamilyEvaluator(family, data, settings)
        for group in groups:
            yield group, evaluator.rows(group)
        return
    # spawned, not forked: a forked child would inherit torch's thread pools and whatever locks they held
    pool = ProcessPoolExecutor(min(settings.workers, len(groups)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(family, data, settings))
    try:
        yield from zip(groups, pool.map(_worker_rows, groups), strict=True)
    finally:
        pool.shutdown(cancel_futures=True)


class FamilyEvaluator:
    """One size loaded for measuring: its task vectors, the base model whose weights are swapped, the eval data.

    A group's rows do not depend on the groups measured before it (every merged tensor is overwritten), so groups
    may be measured in any order and spread over processes or machines: on the same hardware and torch build, the
    table is the same bit for bit."""

    def __init__(self, family: SizeFamily, data: Path, settings: SweepSettings):
        self.family, self.settings = family, settings
        self.examples = {domain: load_split(data, domain, "eval")[: settings.eval_examples]
                         for domain in data_domains(data)}
        self.vectors = TaskVectors(family)
        self.model, self.tokenizer = load_for_evaluation(family.base)
        self.targets = model_targets(self.model, self.vectors.names, family.base)
        self.n_params_b = self.model.num_parameters() / 1e9
        self.method: MergeMethod | None = None
        self.sparsified: list[dict[str, torch.Tensor]] = []

    def _use(self, name: str) -> MergeMethod:
        # groups come method by method, so one method's per-expert cache is held at a time
        if self.method is None or self.method.name != name:
            self.method = build_method(name, self.settings.method_params(name), self.settings.seed)
            self.sparsified = self.vectors.sparsified(self.method)
        return self.method

    def rows(self, group: Group) -> list[Row]:
        method = self._use(group.method)
        self.vectors.merge_into(self.targets, method, self.sparsified, group.subset)
        members = {self.family.expert_names[i] for i in group.subset}
        rows = []
        for domain, examples in self.examples.items():
            ce, tokens = cross_entropy(self.model, self.tokenizer, examples, self.settings.batch_size,
                                       self.model.config.max_position_embeddings)
            rows.append({"size": self.family.name, "n_params_b": self.n_params_b,
                         "pool_size": len(self.family.experts), "method": group.method,
                         "method_params": _params_json(self.settings, group.method), "design": self.settings.design,
                         "seed": self.settings.seed, "eval_examples": self.settings.eval_examples, "k": group.k,
                         "subset": group.label, "domain": domain, "in_domain": domain in members,
                         "ce": ce, "tokens": tokens})
        return rows


_worker_evaluator: FamilyEvaluator | None = None  # one per worker process


def _start_worker(family: SizeFamily, data: Path, settings: SweepSettings) -> None:
    global _worker_evaluator
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it saves the table and stops the pool
    torch.set_num_threads(1)  # the workers are the parallelism; more threads each would oversubscribe the cores
    _worker_evaluator = FamilyEvaluator(family, data, settings)


def _worker_rows(group: Group) -> list[Row]:
    return _worker_evaluator.rows(group)
