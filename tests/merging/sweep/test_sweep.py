"""Subset sweeps: designs, in-memory merges equal to merge() on disk, rows, resume, and bad input."""

import itertools
import json
import math
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from merging import merge
from merging.config import MergeConfig
from merging.data.loading import load_split
from merging.errors import ConfigError
from merging.evaluate import cross_entropy, load_for_evaluation
from merging.methods import build_method
from merging.sweep.designs import all_subsets, balanced_subsets, design_subsets, diverse_permutations, prefix_subsets
from merging.sweep.run import SweepSettings, run_sweep
from merging.sweep.table import COLUMNS, read_table, write_table
from merging.sweep.task_vectors import TaskVectors, model_targets
from merging.zoo.layout import SizeFamily, zoo_families

POOL = 9
# two methods, the identity and reversed permutations' prefixes: 17 subsets per method, 2 eval examples per domain
SMALL_SWEEP = SweepSettings(methods=("average", "ties"), design="diverse", max_subsets=2, eval_examples=2)


def sweep_zoo(zoo, out, settings, progress=None):
    """A sweep of a zoo folder's sizes on its data, as mergeplan sweep runs it."""
    return run_sweep(zoo_families(zoo), zoo / "data", out, settings, progress)


@pytest.fixture(scope="module")
def tiny_sweep(tiny_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "sweep.parquet"
    report = sweep_zoo(tiny_zoo, out, SMALL_SWEEP)
    return out, report


def groups_of(table: dict[str, list]) -> list[tuple[str, str, str]]:
    return list(dict.fromkeys(zip(table["size"], table["method"], table["subset"], strict=True)))


# --- designs ----------------------------------------------------------------------------------------------------


def test_all_design_has_every_subset_of_each_size():
    design = design_subsets("all", POOL, None, seed=0)
    assert [len(design[k]) for k in range(1, POOL + 1)] == [math.comb(POOL, k) for k in range(1, POOL + 1)]
    assert design[3] == list(itertools.combinations(range(POOL), 3))


def test_all_design_above_the_cap_takes_diverse_permutation_prefixes():
    design = design_subsets("all", POOL, 20, seed=5)
    permutations = diverse_permutations(POOL, 20, seed=5)
    assert design[1] == all_subsets(POOL, 1) and design[8] == all_subsets(POOL, 8)  # C(9, k) = 9 <= 20
    for k in range(2, 8):
        assert design[k] == prefix_subsets(permutations, k)
        assert len(design[k]) <= 20 and len(set(design[k])) == len(design[k])
    assert design[4][0] == (0, 1, 2, 3) and design[4][1] == (5, 6, 7, 8)  # the identity, then its reverse


def test_diverse_permutations_are_seeded_and_spread_out():
    first = diverse_permutations(POOL, 12, seed=1)
    assert first == diverse_permutations(POOL, 12, seed=1)
    assert first != diverse_permutations(POOL, 12, seed=2)
    assert first[0] == tuple(range(POOL)) and first[1] == tuple(reversed(range(POOL)))
    assert all(sorted(p) == list(range(POOL)) for p in first) and len(set(first)) == 12
    # each added permutation is far from those before it: random shuffles of 9 share about 1 position
    for index in range(2, 12):
        nearest = min(sum(a != b for a, b in zip(first[index], earlier, strict=True)) for earlier in first[:index])
        assert nearest >= 7
    assert prefix_subsets(first, 2)[:2] == [(0, 1), (7, 8)]


def test_balanced_design_has_each_expert_exactly_k_times():
    for k in range(1, POOL):
        subsets = balanced_subsets(POOL, k, seed=3)
        assert len(subsets) == POOL and len(set(subsets)) == POOL
        assert Counter(i for subset in subsets for i in subset) == dict.fromkeys(range(POOL), k)
    assert balanced_subsets(POOL, POOL, seed=3) == [tuple(range(POOL))]
    assert balanced_subsets(POOL, 4, seed=3) == balanced_subsets(POOL, 4, seed=3) != balanced_subsets(POOL, 4, seed=4)


def test_design_bad_input():
    with pytest.raises(ConfigError, match="balanced design has M = 9 subsets per k"):
        design_subsets("balanced", POOL, 4, seed=0)
    with pytest.raises(ConfigError, match="set a cap per k"):
        design_subsets("all", 20, None, seed=0)


# --- in-memory merges -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "subset"), [
    ("average", (1, 4, 6)), ("task_arithmetic", (1, 4, 6)), ("ties", (1, 4, 6)),
    # a merge() seeds DARE by position in its own list, the sweep by index in the pool: equal for a prefix
    ("dare_ties", (0, 1, 2)),
])
def test_in_memory_subset_merge_equals_merge_on_disk(tiny_zoo, tmp_path, method, subset):
    family = zoo_families(tiny_zoo)[0]
    params = SweepSettings().method_params(method)
    merger = build_method(method, params, seed=3)
    vectors = TaskVectors(family)
    model, tokenizer = load_for_evaluation(family.base)
    targets = model_targets(model, vectors.names, family.base)
    sparsified = vectors.sparsified(merger)
    vectors.merge_into(targets, merger, sparsified, tuple(range(POOL)))  # another subset first: weights are swapped
    vectors.merge_into(targets, merger, sparsified, subset)
    config = MergeConfig(base=family.base, experts=[{"path": family.expert_folders[i]} for i in subset], method=method,
                         params=params, seed=3)
    on_disk, _ = load_for_evaluation(merge(config, tmp_path / "merged"))
    in_memory = model.state_dict()
    for name, tensor in on_disk.state_dict().items():
        assert torch.equal(tensor, in_memory[name]), name
    examples = load_split(tiny_zoo / "data", "algebra", "eval")[:4]
    assert cross_entropy(model, tokenizer, examples, 4, 128) == cross_entropy(on_disk, tokenizer, examples, 4, 128)


# --- rows and resume --------------------------------------------------------------------------------------------


def test_sweep_rows(tiny_zoo, tiny_sweep):
    out, report = tiny_sweep
    table = read_table(out)
    assert tuple(table) == COLUMNS
    assert report.groups == report.computed == 2 * 17 and report.skipped == 0
    assert len(table["ce"]) == 2 * 17 * POOL
    assert set(table["size"]) == {"tiny"} and set(table["pool_size"]) == {POOL}
    assert set(table["method_params"]) == {"{}", '{"density": 0.2, "lambda": 1.0}'}
    n_params = load_for_evaluation(tiny_zoo / "base")[0].num_parameters()
    assert set(table["n_params_b"]) == {n_params / 1e9}
    assert Counter(table["k"])[1] == 2 * 2 * POOL and Counter(table["k"])[POOL] == 2 * POOL
    for subset, domain, in_domain, k in zip(table["subset"], table["domain"], table["in_domain"], table["k"],
                                            strict=True):
        assert in_domain == (domain in subset.split("+")) and len(subset.split("+")) == k
    assert table["subset"][:POOL] == ["algebra"] * POOL and table["subset"][POOL] == "physics"
    assert all(np.isfinite(table["ce"])) and min(table["tokens"]) > 0


def test_a_family_names_its_size_and_experts(tiny_zoo, tmp_path):
    [zoo] = zoo_families(tiny_zoo)
    experts = tuple((f"expert-{name}", folder) for name, folder in zoo.experts[:2])
    settings = SweepSettings(methods=("average",), design="diverse", max_subsets=1, eval_examples=1, ks=(2,))
    report = run_sweep([SizeFamily("base-v1", zoo.base, experts)], tiny_zoo / "data", tmp_path / "sweep.csv", settings)
    table = read_table(report.path)
    assert set(table["size"]) == {"base-v1"} and set(table["pool_size"]) == {2}
    assert set(table["subset"]) == {"+".join(name for name, _ in experts)}
    assert not any(table["in_domain"])  # a row is in-domain when an expert of the subset has its domain's name


def test_interrupted_sweep_resumes_to_the_same_table(tiny_zoo, tiny_sweep, tmp_path):
    whole, whole_report = tiny_sweep

    class Interrupted(Exception):
        pass

    def stop_after_five(progress):
        if progress.computed == 5:
            raise Interrupted

    part = tmp_path / "sweep.parquet"
    with pytest.raises(Interrupted):
        sweep_zoo(tiny_zoo, part, SMALL_SWEEP, stop_after_five)
    assert len(groups_of(read_table(part))) == 5
    resumed = sweep_zoo(tiny_zoo, part, SMALL_SWEEP)
    assert (resumed.skipped, resumed.computed) == (5, whole_report.groups - 5)
    assert read_table(part) == read_table(whole)  # and the same rows again: the sweep is reproducible


def test_worker_processes_measure_the_same_rows(tiny_zoo, tiny_sweep, tmp_path):
    whole, _ = tiny_sweep
    report = sweep_zoo(tiny_zoo, tmp_path / "sweep.parquet", SMALL_SWEEP.model_copy(update={"workers": 2}))
    assert report.computed == report.groups == 2 * 17
    parallel, serial = read_table(tmp_path / "sweep.parquet"), read_table(whole)
    # one thread per worker: CE sums may differ from this process's threads in the last bits
    assert parallel["ce"] == pytest.approx(serial["ce"], rel=1e-6)
    assert {key: values for key, values in parallel.items() if key != "ce"} == {
        key: values for key, values in serial.items() if key != "ce"}


def test_parts_by_k_join_to_the_whole_sweep(tiny_zoo, tiny_sweep, tmp_path):
    whole = read_table(tiny_sweep[0])
    rows = []
    for ks in [(1, 2), (3,), tuple(range(4, POOL + 1))]:
        part = tmp_path / f"part-{ks[0]}.parquet"
        sweep_zoo(tiny_zoo, part, SMALL_SWEEP.model_copy(update={"methods": ("ties",), "ks": ks}))
        table = read_table(part)
        assert set(table["k"]) == set(ks)
        rows += list(zip(*table.values(), strict=True))
    ties = [row for row in zip(*whole.values(), strict=True) if row[list(whole).index("method")] == "ties"]
    assert sorted(rows) == sorted(ties)


def test_a_group_missing_a_domain_is_measured_again(tiny_zoo, tiny_sweep, tmp_path):
    whole, _ = tiny_sweep
    table = read_table(whole)
    rows = [dict(zip(table, values, strict=True)) for values in zip(*table.values(), strict=True)]
    cut = tmp_path / "sweep.csv"
    write_table(rows[:-1], cut)  # the last subset lost its last domain
    report = sweep_zoo(tiny_zoo, cut, SMALL_SWEEP)
    assert (report.skipped, report.computed) == (report.groups - 1, 1)
    assert read_table(cut) == table


def test_resuming_with_other_settings_is_refused(tiny_zoo, tiny_sweep, tmp_path):
    whole, _ = tiny_sweep
    with pytest.raises(ConfigError, match="eval_examples 2, this run has 3"):
        sweep_zoo(tiny_zoo, whole, SMALL_SWEEP.model_copy(update={"eval_examples": 3}))
    with pytest.raises(ConfigError, match="ties was measured with params"):
        sweep_zoo(tiny_zoo, whole, SMALL_SWEEP.model_copy(update={"params": {"ties": {"lambda": 0.5}}}))
    with pytest.raises(ConfigError, match="which this design does not measure"):
        sweep_zoo(tiny_zoo, whole, SMALL_SWEEP.model_copy(update={"max_subsets": 1}))


def test_sweep_bad_input(tiny_zoo, tmp_path):
    with pytest.raises(ConfigError, match=r"\.parquet or \.csv"):
        sweep_zoo(tiny_zoo, tmp_path / "sweep.json", SMALL_SWEEP)
    with pytest.raises(ConfigError, match="unknown method 'sum'"):
        sweep_zoo(tiny_zoo, tmp_path / "sweep.csv", SweepSettings(methods=("sum",)))
    with pytest.raises(ConfigError, match=r"sweep.ties: params.density"):
        sweep_zoo(tiny_zoo, tmp_path / "sweep.csv", SweepSettings(methods=("ties",), params={"ties": {"density": 0}}))
    pq.write_table(pa.table({"size": ["s"], "k": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(ConfigError, match="column 'n_params_b' is missing"):
        read_table(tmp_path / "bad.parquet")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staged file left behind


def test_cli_sweep_resume_fit_and_plan(tiny_zoo, run_cli, tmp_path):
    sweep = ("sweep", "--zoo", tiny_zoo, "--out", tmp_path / "sweep.csv", "--methods", "average", "--design",
             "diverse", "--max-subsets", 1, "--eval-examples", 1)
    status, out, err = run_cli(*sweep)
    assert status == 0, err
    assert "sweep.csv: 9 merged models (9 measured now, 0 already there)" in out
    status, out, err = run_cli(*sweep)
    assert "(0 measured now, 9 already there)" in out
    status, out, err = run_cli("fit", tmp_path / "sweep.csv", "--out", tmp_path / "fit", "--domains", "macro")
    assert status == 0, err
    record = json.loads((tmp_path / "fit" / "fit.json").read_text())["curves"]["tiny"]["average"]["macro"]
    assert record["points"]["count"] == [1] * POOL  # one permutation: one subset per k, so no bootstrap
    assert record["ci"] is None and "several subsets per k" in record["ci_skipped"]["skipped"]
    assert "skipped" in record["variance"] and "relative_error_at_pool" in record["forecast"]
    status, out, err = run_cli("plan", tmp_path / "fit", "--epsilon", 0.05)
    assert status == 0, err
    assert "experts come within 0.05 of the floor" in out and "±" not in out
