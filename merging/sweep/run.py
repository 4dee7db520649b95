"""Expert-subset sweeps for the merging scaling law: which subsets, merged in memory, evaluated per domain.

For every base size of a zoo, every method and every subset of a design, the subset's experts are merged into
a model loaded once per size (weights swapped in place, no checkpoint written) and its response-only CE is
measured on each domain's eval split. One row per (size, method, k, subset, domain):

    size  n_params_b  pool_size  method  method_params  design  seed  eval_examples
    k  subset  domain  in_domain  ce  tokens

`n_params_b` is N in billions of parameters, `pool_size` the number of experts M of that size, `subset` the
subset's expert (domain) names joined by "+", `in_domain` whether the row's domain has its expert in the subset.
The macro cross-domain CE of a subset (the mean over its domains) is not stored: it is computed when fitting,
so the table holds measurements only.

Designs, per k = 1 … M (a subset is a set: prefixes or windows that repeat one are kept once):
- all: every C(M, k) subset where that count is at most `max_subsets`, otherwise the length-k prefixes of
  `max_subsets` diverse permutations (the paper's recipe);
- diverse: the length-k prefixes of `max_subsets` (default M) diverse permutations, for every k;
- balanced: the M cyclic windows of length k over a seeded shuffle of the experts, so that each expert is in
  exactly k of the M subsets (what the per-domain fits need).

The work is shared: each expert's task vector is read once per size, and each method's per-expert part (TIES
trimming, DARE dropping) once per method; a subset merge then only folds cached tensors. DARE draws its mask
from the expert's index in the whole pool, so a subset's merge does not depend on which other experts it has.
With `workers` > 1, subsets are spread over that many spawned processes (one torch thread each), each holding
its own copy of the size's model and task vectors.

The table is written atomically (temporary file, then rename) every `flush_seconds` and at the end, also when
the sweep is interrupted; started again with the same output, a sweep skips the (size, method, subset) groups
already there.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from merging.data.loading import data_domains, load_split
from merging.errors import CheckpointError, ConfigError
from merging.evaluate import cross_entropy, load_for_evaluation
from merging.experts import Expert, open_expert, require_finite
from merging.io.checkpoint import CheckpointReader
from merging.methods import MergeMethod, build_method
from merging.progress_bar import progress_bar
from merging.seeding import derived_seed
from merging.zoo.build import expert_folders

log = logging.getLogger("mergeplan")

Design = Literal["all", "diverse", "balanced"]
# The paper's variants (spec: TA is θ0 + 0.8·mean(τ); TIES and DARE keep 20 % of each task vector at λ = 1).
DEFAULT_METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "average": {},
    "task_arithmetic": {"lambda": 0.8, "normalize": True},
    "ties": {"density": 0.2, "lambda": 1.0},
    "dare_ties": {"density": 0.2, "lambda": 1.0},
}
DEFAULT_METHODS = tuple(DEFAULT_METHOD_PARAMS)
SCHEMA = pa.schema([
    ("size", pa.string()), ("n_params_b", pa.float64()), ("pool_size", pa.int64()), ("method", pa.string()),
    ("method_params", pa.string()), ("design", pa.string()), ("seed", pa.int64()), ("eval_examples", pa.int64()),
    ("k", pa.int64()), ("subset", pa.string()), ("domain", pa.string()), ("in_domain", pa.bool_()),
    ("ce", pa.float64()), ("tokens", pa.int64()),
])
COLUMNS = tuple(SCHEMA.names)
TABLE_SUFFIXES = (".parquet", ".csv")
SUBSET_SEPARATOR = "+"
PERMUTATION_CANDIDATES = 1000
MAX_UNCAPPED_SUBSETS = 10_000  # beyond this, "every subset" is a mistake rather than a plan: ask for a cap

Subset = tuple[int, ...]  # global expert indices, ascending
Row = dict[str, Any]


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
    ks: tuple[int, ...] | None = Field(None, description="only these expert counts (default every k = 1 … M): one "
                                       "part of a sweep that is spread over machines")

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
class SizeFamily:
    """One base size of a zoo: its base checkpoint and its experts (one per domain, sorted by name)."""

    name: str
    base: Path
    experts: tuple[Path, ...]

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(path.name for path in self.experts)

    def label(self, subset: Subset) -> str:
        return SUBSET_SEPARATOR.join(self.expert_names[i] for i in subset)


@dataclass(frozen=True)
class Group:
    """One merged model of the sweep: a subset of one size's experts merged by one method."""

    family: SizeFamily
    method: str
    k: int
    subset: Subset

    @property
    def key(self) -> tuple[str, str, str]:
        return self.family.name, self.method, self.family.label(self.subset)


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


# ---------------------------------------------------------------------------------------------------------------
# Subset designs


def all_subsets(pool_size: int, k: int) -> list[Subset]:
    return list(itertools.combinations(range(pool_size), k))


def diverse_permutations(pool_size: int, count: int, seed: int,
                         candidates: int = PERMUTATION_CANDIDATES) -> list[tuple[int, ...]]:
    """The paper's diverse permutations: 0 … M−1 and its reverse, then, one at a time, the one of `candidates`
    seeded random shuffles whose smallest Hamming distance to those already chosen is largest."""
    rng = np.random.default_rng(derived_seed(seed, "diverse-permutations", pool_size))
    identity = np.arange(pool_size)
    chosen = [identity, identity[::-1]][:count]
    while len(chosen) < count:
        shuffles = rng.permuted(np.tile(identity, (candidates, 1)), axis=1)
        distance = (shuffles[:, None, :] != np.stack(chosen)[None]).sum(axis=2).min(axis=1)
        chosen.append(shuffles[int(np.argmax(distance))])
    return [tuple(int(i) for i in permutation) for permutation in chosen]


def prefix_subsets(permutations: list[tuple[int, ...]], k: int) -> list[Subset]:
    return _distinct(tuple(sorted(permutation[:k])) for permutation in permutations)


def balanced_subsets(pool_size: int, k: int, seed: int) -> list[Subset]:
    """The M cyclic windows of length k over a seeded shuffle: each expert is in exactly k of them."""
    order = np.random.default_rng(derived_seed(seed, "balanced", pool_size, k)).permutation(pool_size)
    return _distinct(tuple(sorted(int(order[(start + offset) % pool_size]) for offset in range(k)))
                     for start in range(pool_size))


def _distinct(subsets: Iterator[Subset]) -> list[Subset]:
    return list(dict.fromkeys(subsets))


def design_subsets(design: Design, pool_size: int, max_subsets: int | None, seed: int) -> dict[int, list[Subset]]:
    """The subsets to measure at each k = 1 … M, in measurement order."""
    if pool_size < 1:
        raise ConfigError("a sweep needs at least one expert")
    ks = range(1, pool_size + 1)
    if design == "balanced":
        if max_subsets is not None and max_subsets < pool_size:
            raise ConfigError(f"max_subsets: the balanced design has M = {pool_size} subsets per k by construction; "
                              f"drop the cap or choose the all or diverse design")
        return {k: balanced_subsets(pool_size, k, seed) for k in ks}
    if design == "diverse":
        permutations = diverse_permutations(pool_size, max_subsets or pool_size, seed)
        return {k: prefix_subsets(permutations, k) for k in ks}
    if design != "all":
        raise ConfigError(f"design: unknown design {design!r}; choose all, diverse or balanced")
    if max_subsets is None:
        total = 2**pool_size - 1
        if total > MAX_UNCAPPED_SUBSETS:
            raise ConfigError(f"max_subsets: {pool_size} experts have {total} subsets; set a cap per k "
                              f"(e.g. --max-subsets 50)")
        return {k: all_subsets(pool_size, k) for k in ks}
    permutations = diverse_permutations(pool_size, max_subsets, seed)
    return {k: all_subsets(pool_size, k) if math.comb(pool_size, k) <= max_subsets
            else prefix_subsets(permutations, k) for k in ks}


# ---------------------------------------------------------------------------------------------------------------
# Zoo layout


def zoo_families(zoo: Path) -> list[SizeFamily]:
    """The base sizes of a zoo: base/ + experts/ at the top (one size), or in SIZE/ folders (several sizes)."""
    if not zoo.is_dir():
        raise ConfigError(f"{zoo}: no such zoo folder (build one with mergeplan zoo build)")
    if (zoo / "base").is_dir():
        return [_family(zoo, _single_size_name(zoo))]
    families = [_family(folder, folder.name) for folder in sorted(zoo.iterdir())
                if (folder / "base").is_dir() and (folder / "experts").is_dir()]
    if not families:
        raise ConfigError(f"{zoo}: not a zoo folder (expected base/ and experts/, or SIZE/base/ and SIZE/experts/)")
    return sorted(families, key=lambda family: _parameter_count(CheckpointReader(family.base)))


def _family(folder: Path, name: str) -> SizeFamily:
    if not (folder / "experts").is_dir():
        raise ConfigError(f"{folder}: no experts/ folder next to base/; a sweep merges the experts of a zoo")
    experts = tuple(expert_folders(folder))
    if not experts:
        raise ConfigError(f"{folder / 'experts'}: no expert folders")
    return SizeFamily(name, folder / "base", experts)


def _single_size_name(zoo: Path) -> str:
    manifest = zoo / "manifest.json"
    if manifest.is_file():
        sizes = json.loads(manifest.read_text()).get("preset", {}).get("sizes") or []
        if len(sizes) == 1 and sizes[0].get("name"):
            return str(sizes[0]["name"])
    return zoo.resolve().name


def _parameter_count(reader: CheckpointReader) -> int:
    return sum(math.prod(info.shape) for info in reader.tensors.values())


# ---------------------------------------------------------------------------------------------------------------
# In-memory subset merges


class TaskVectors:
    """One size's base tensors and every expert's task vector in float32, read once; subset merges fold them.

    The arithmetic is the streaming merge's (merging.streaming) for experts of weight 1, so a subset merged here
    has the same weights as `merging.merge` of that subset (for DARE: when the subset's experts are the first
    of the pool, since a merge seeds DARE by position in its own list).
    """

    def __init__(self, family: SizeFamily):
        base = CheckpointReader(family.base)
        experts = [open_expert(path) for path in family.experts]
        for expert in experts:
            expert.check_compatible(base)
        # integer and boolean tensors are never merged (as in merging.merger): the loaded base keeps them
        self.names = [name for name, info in base.tensors.items() if info.dtype.is_floating_point]
        self.stored_dtype = {name: base.tensors[name].dtype for name in self.names}
        self.base = {name: base.read(name).float() for name in self.names}
        for name, tensor in self.base.items():
            require_finite(tensor, base.folder, name)
        self.vectors = [self._task_vector(expert) for expert in experts]

    def _task_vector(self, expert: Expert) -> dict[str, torch.Tensor]:
        """The expert's non-zero task vectors (an adapter leaves most tensors as the base has them)."""
        vectors = {name: expert.read_task_vector(name, self.base[name]) for name in self.names}
        return {name: vector for name, vector in vectors.items() if vector is not None}

    def sparsified(self, method: MergeMethod) -> list[dict[str, torch.Tensor]]:
        """Each expert's part that enters `method`'s fold; it does not depend on the subset, so it is cached."""
        return [{name: method.sparsify(tensor.clone(), name, index) for name, tensor in vector.items()}
                for index, vector in enumerate(self.vectors)]

    def merge_into(self, targets: dict[str, torch.Tensor], method: MergeMethod,
                   sparsified: list[dict[str, torch.Tensor]], subset: Subset) -> None:
        """Write base + the method's merged task vector of `subset` into `targets` (a model's state dict)."""
        for name in self.names:
            base = self.base[name]
            state = {key: base.new_zeros(method.state_shape(key, base.shape)) for key in method.state_names}
            scratch = torch.empty_like(base)
            for index in subset:
                if name not in sparsified[index]:
                    continue  # a zero task vector adds nothing to any method's accumulators
                # a method may fold the delta in place (TIES splits it by sign), so the cache is copied first
                method.add(state, scratch.copy_(sparsified[index][name]), 1.0)
            merged = base + method.delta(state, float(len(subset)), base)
            # through the stored dtype, as a checkpoint written by merge() and loaded again would be
            targets[name].copy_(merged.to(self.stored_dtype[name]))


def model_targets(model: torch.nn.Module, names: list[str], folder: Path) -> dict[str, torch.Tensor]:
    """The model's tensors (sharing storage with its parameters) that the checkpoint's tensors are copied into."""
    state = model.state_dict()
    missing = [name for name in names if name not in state]
    if missing:
        raise CheckpointError(f"{folder}: tensor {missing[0]} has no counterpart in the model loaded from it "
                              f"({len(missing)} such); the sweep needs checkpoint names that match the model's")
    return {name: state[name] for name in names}


# ---------------------------------------------------------------------------------------------------------------
# Table files


def table_format(path: Path) -> str:
    if path.suffix not in TABLE_SUFFIXES:
        raise ConfigError(f"{path}: a sweep table is .parquet or .csv; name the file with one of those suffixes")
    return path.suffix[1:]


def read_table(path: str | Path, required: tuple[str, ...] = COLUMNS) -> dict[str, list]:
    """A sweep table as {column: values}; known columns get the sweep's types, a missing one is refused."""
    path = Path(path)
    kind = table_format(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep table; run mergeplan sweep first")
    try:
        if kind == "csv":
            options = pa_csv.ConvertOptions(column_types={field.name: field.type for field in SCHEMA})
            table = pa_csv.read_csv(path, convert_options=options)
        else:
            table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{path}: cannot be read as {kind} ({str(exc).splitlines()[0]})") from exc
    missing = [column for column in required if column not in table.column_names]
    if missing:
        raise ConfigError(f"{path}: column {missing[0]!r} is missing (needed: {', '.join(required)}); "
                          "pass a table written by mergeplan sweep")
    columns = {}
    for name in table.column_names:
        values = table.column(name)
        if name in SCHEMA.names:
            try:
                values = values.cast(SCHEMA.field(name).type)
            except pa.ArrowException as exc:
                raise ConfigError(f"{path}: column {name!r} cannot be read as {SCHEMA.field(name).type} "
                                  f"({str(exc).splitlines()[0]})") from exc
        columns[name] = values.to_pylist()
    if "ce" in columns:  # CSV reads NaN back as null
        columns["ce"] = [float("nan") if value is None else value for value in columns["ce"]]
    return columns


def write_table(rows: list[Row], path: str | Path) -> None:
    """Write rows atomically: into a hidden sibling file, then renamed over `path`."""
    path = Path(path)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        if table_format(path) == "csv":
            pa_csv.write_csv(table, staging)
        else:
            pq.write_table(table, staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def _rows_by_group(columns: dict[str, list]) -> dict[tuple[str, str, str], list[Row]]:
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for values in zip(*(columns[name] for name in COLUMNS), strict=True):
        row = dict(zip(COLUMNS, values, strict=True))
        groups.setdefault((row["size"], row["method"], row["subset"]), []).append(row)
    return groups


# ---------------------------------------------------------------------------------------------------------------
# The sweep


def sweep_plan(families: list[SizeFamily], settings: SweepSettings) -> list[Group]:
    """Every (size, method, subset) to measure, in order: sizes by parameter count, methods as given, k ascending."""
    plan = []
    for family in families:
        designs = design_subsets(settings.design, len(family.experts), settings.max_subsets, settings.seed)
        plan += [Group(family, method, k, subset) for method in settings.methods
                 for k, subsets in designs.items() if settings.ks is None or k in settings.ks for subset in subsets]
    return plan


class _Sweep:
    """State of one run: the rows kept so far (by group) and when they were last written."""

    def __init__(self, out: Path, plan: list[Group], settings: SweepSettings, domains: list[str],
                 progress: Callable[[SweepProgress], None] | None):
        self.out, self.plan, self.settings, self.progress = out, plan, settings, progress
        self.domains = sorted(domains)
        self.order = {group.key: position for position, group in enumerate(plan)}
        self.rows, self.foreign = self._resume()
        self.skipped = len(self.rows)
        self.computed = 0
        self.started = self.last_flush = time.perf_counter()
        self.unflushed = False

    def _resume(self) -> tuple[dict[tuple[str, str, str], list[Row]], list[Row]]:
        """Finished groups of this plan found in the output, and rows of other sizes or methods (kept as they are)."""
        if not self.out.exists():
            return {}, []
        groups = _rows_by_group(read_table(self.out))
        self._check_settings(groups)
        rows, foreign = {}, []
        planned_pairs = {(group.family.name, group.method) for group in self.plan}
        for key, group_rows in groups.items():
            if key in self.order:
                rows[key] = group_rows
            elif key[:2] in planned_pairs:
                raise ConfigError(f"{self.out}: has subset {key[2]} of {key[1]} at size {key[0]}, which this design "
                                  "does not measure; resume with the settings it was written with or use a new --out")
            else:
                foreign += group_rows
        # a group missing a domain (a table cut short by hand) is measured again
        complete = {key: group_rows for key, group_rows in rows.items()
                    if sorted(row["domain"] for row in group_rows) == self.domains}
        if rows:
            log.info("resuming %s: %d of %d subsets already measured", self.out, len(complete), len(self.plan))
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
            log.info("sweep: %d/%d subsets, %.1f merged models per minute", len(self.rows), len(self.plan),
                     60 * self.computed / (now - self.started))
        if self.progress is not None:
            self.progress(SweepProgress(len(self.rows), len(self.plan), self.computed, group, now - self.started))

    def flush(self) -> None:
        if self.unflushed or not self.out.exists():
            ordered = sorted(self.rows.items(), key=lambda item: self.order[item[0]])
            write_table([row for _, rows in ordered for row in rows] + self.foreign, self.out)
        self.unflushed = False
        self.last_flush = time.perf_counter()


def _params_json(settings: SweepSettings, method: str) -> str:
    return json.dumps(settings.method_params(method), sort_keys=True)


def run_sweep(zoo: str | Path, out: str | Path, settings: SweepSettings | None = None,
              progress: Callable[[SweepProgress], None] | None = None) -> SweepReport:
    """Measure every subset of the design for every size of `zoo` and method; rows go to `out` (.parquet/.csv).

    `progress` is called after each merged and evaluated subset. Groups already in `out` are skipped.
    """
    settings = settings or SweepSettings()
    zoo, out = Path(zoo), Path(out)
    table_format(out)
    for name in settings.methods:  # every method's params are checked before any model is loaded
        method = build_method(name, settings.method_params(name), settings.seed, source=f"sweep.{name}")
        if method.min_experts > 1 or method.max_experts is not None:
            raise ConfigError(f"sweep.{name}: a sweep merges subsets of every size from one expert up, which {name} "
                              "does not take; sweep another method")
    families = zoo_families(zoo)
    plan = sweep_plan(families, settings)
    data = zoo / "data"
    sweep = _Sweep(out, plan, settings, data_domains(data), progress)
    try:
        for family in families:
            groups = [group for group in plan if group.family == family and not sweep.finished(group)]
            for group, rows in progress_bar(_measure(family, groups, data, settings), f"sweep {family.name}",
                                            "subset", total=len(groups)):
                sweep.record(group, rows)
    finally:
        sweep.flush()
    seconds = time.perf_counter() - sweep.started
    return SweepReport(out, len(plan), sweep.computed, sweep.skipped, seconds)


def _measure(family: SizeFamily, groups: list[Group], data: Path,
             settings: SweepSettings) -> Iterator[tuple[Group, list[Row]]]:
    """Each group with its rows, in order: in this process, or spread over `settings.workers` processes."""
    if not groups:
        return
    if settings.workers == 1:
        evaluator = _FamilyEvaluator(family, data, settings)
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


class _FamilyEvaluator:
    """One size loaded for measuring: its task vectors, the base model whose weights are swapped, the eval data."""

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
                         "subset": self.family.label(group.subset), "domain": domain, "in_domain": domain in members,
                         "ce": ce, "tokens": tokens})
        return rows


_worker_evaluator: _FamilyEvaluator | None = None  # one per worker process


def _start_worker(family: SizeFamily, data: Path, settings: SweepSettings) -> None:
    global _worker_evaluator
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it saves the table and stops the pool
    torch.set_num_threads(1)  # the workers are the parallelism; more threads each would oversubscribe the cores
    _worker_evaluator = _FamilyEvaluator(family, data, settings)


def _worker_rows(group: Group) -> list[Row]:
    return _worker_evaluator.rows(group)
