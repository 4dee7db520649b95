"""Fitting sweep tables and planning from fit folders, on tables drawn from a known law (no models needed)."""

import csv
import itertools
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from merging.errors import ConfigError
from merging.scaling_law.advice import PlanRequest, plan_from_fit
from merging.scaling_law.curve import CurveParams
from merging.scaling_law.fit_folder import FitSettings, fit_sweep, load_fit
from merging.scaling_law.joint import JointParams
from merging.scaling_law.planning import experts_for_target, fitted_realisation, plan, size_or_experts, stop_at
from merging.sweep.table import write_table

POOL = 5
EXPERTS = ("alpha", "beta", "gamma", "delta", "epsilon")
DOMAINS = ("alpha", "beta")
DOMAIN_SHIFT = {"alpha": -0.1, "beta": 0.1}  # cancels in the macro mean
JOINT = JointParams(floor_limit=0.3, floor_scale=0.002, floor_exponent=0.4, amplitude_scale=0.07,
                    amplitude_exponent=0.1, offset=0.25)
SIZES = {"s": 0.0002, "m": 0.001, "l": 0.004}
FAST = FitSettings(resamples=5)


def law_rows(sizes: dict[str, float] = SIZES, ks=range(1, POOL + 1), method: str = "average",
             seed: int = 0) -> list[dict]:
    """Every subset of 5 experts at each size: the joint law, each expert's own effect, small noise per domain."""
    rng = np.random.default_rng(seed)
    rows = []
    for size, n in sizes.items():
        effects = rng.normal(0, 0.01, POOL)
        for k in ks:
            for subset in itertools.combinations(range(POOL), k):
                loss = float(JOINT.loss(n, k)) + effects[list(subset)].mean() - effects.mean()
                names = [EXPERTS[i] for i in subset]
                rows += [{"size": size, "n_params_b": n, "pool_size": POOL, "method": method, "method_params": "{}",
                          "design": "all", "seed": 0, "eval_examples": 8, "k": k, "subset": "+".join(names),
                          "domain": domain, "in_domain": domain in names,
                          "ce": loss + DOMAIN_SHIFT[domain] + rng.normal(0, 0.001), "tokens": 100}
                         for domain in DOMAINS]
    return rows


def macro_means(rows: list[dict], size: str) -> dict[int, float]:
    by_subset: dict[str, list[float]] = {}
    k_of = {}
    for row in rows:
        if row["size"] == size:
            by_subset.setdefault(row["subset"], []).append(row["ce"])
            k_of[row["subset"]] = row["k"]
    return {k: float(np.mean([np.mean(v) for s, v in by_subset.items() if k_of[s] == k]))
            for k in sorted(set(k_of.values()))}


@pytest.fixture(scope="module")
def three_sizes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("law")
    rows = law_rows()
    write_table(rows, folder / "sweep.parquet")
    fit_sweep(folder / "sweep.parquet", folder / "fit", FAST)
    return folder, rows


# --- the fit folder ---------------------------------------------------------------------------------------------


def test_fit_folder_holds_parameters_cis_forecast_variance_and_plots(three_sizes):
    folder, rows = three_sizes
    fit = folder / "fit"
    document = json.loads((fit / "fit.json").read_text())
    assert set(document) == {"format", "sweep", "settings", "sizes", "methods", "domains", "curves", "joint"}
    assert document["sizes"] == {size: {"n_params_b": n, "pool_size": POOL} for size, n in SIZES.items()}
    assert document["domains"] == ["macro", "alpha", "beta"]
    for size, n in SIZES.items():
        record = document["curves"][size]["average"]["macro"]
        truth = JOINT.curve_at(n)
        assert record["params"]["floor"] == pytest.approx(truth.floor, abs=0.01)
        assert record["r_squared"] > 0.99
        points = record["points"]
        assert points["k"] == [1, 2, 3, 4, 5] and points["count"] == [5, 10, 10, 5, 1]
        assert points["mean"] == pytest.approx(list(macro_means(rows, size).values()), abs=1e-12)
        params = CurveParams(**record["params"])
        residuals = np.array(points["mean"]) - params.loss(points["k"])
        assert points["residual"] == pytest.approx(residuals.tolist(), abs=1e-12)
        assert all(low <= high for low, high in record["ci"].values())
        forecast = record["forecast"]
        measured_at_pool = points["mean"][-1]
        assert forecast["relative_error_at_pool"] == pytest.approx(
            (forecast["predicted"][-1] - measured_at_pool) / measured_at_pool)
        assert abs(forecast["relative_error_at_pool"]) < 0.01
        assert record["variance"]["finite_pool_r_squared"] > 0.8
        assert record["variance"]["variance"][-1] == 0  # every subset measured: no spread at k = M
        fitted = fitted_realisation(params, POOL)
        assert (record["realisation"]["fitted"]["k80"], record["realisation"]["fitted"]["k90"]) == (fitted.k80,
                                                                                                     fitted.k90)
        alpha = document["curves"][size]["average"]["alpha"]["params"]["floor"]
        assert alpha == pytest.approx(record["params"]["floor"] - 0.1, abs=0.01)
    joint = document["joint"]["average"]["macro"]
    assert joint["r_squared"] > 0.99 and joint["floor_decreasing_in_n"]
    assert list(joint["floor_by_size"]) == ["s", "m", "l"]
    for size, n in SIZES.items():
        assert joint["floor_by_size"][size] == pytest.approx(float(JOINT.floor(n)), abs=0.01)
    with open(fit / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [(r["size"], r["domain"]) for r in summary] == [(s, d) for s in SIZES for d in ("macro", "alpha", "beta")]
    assert float(summary[0]["floor_low"]) <= float(summary[0]["floor_high"])
    assert (fit / "joint.csv").is_file()
    for size in SIZES:
        for plot in ("loss_vs_k", "residuals", "spread"):
            assert (fit / "plots" / size / f"macro_{plot}.png").stat().st_size > 10_000
    assert (fit / "plots" / "macro_floor_vs_size_average.png").is_file()
    assert not (fit / "plots" / "s" / "alpha_loss_vs_k.png").exists()  # domains are plotted on request only
    assert load_fit(fit).bootstraps["m/average/macro"].shape == (5, 3)
    assert document["curves"]["m"]["average"]["alpha"]["ci"] is None  # domains: point fits unless asked


def test_a_csv_table_fits_like_parquet(three_sizes, tmp_path):
    folder, rows = three_sizes
    write_table(rows, tmp_path / "sweep.csv")
    fit_sweep(tmp_path / "sweep.csv", tmp_path / "fit", FAST.model_copy(update={"domains": "macro"}))
    from_csv = json.loads((tmp_path / "fit" / "fit.json").read_text())["curves"]["l"]["average"]["macro"]
    from_parquet = json.loads((folder / "fit" / "fit.json").read_text())["curves"]["l"]["average"]["macro"]
    assert from_csv["params"] == from_parquet["params"] and from_csv["ci"] == from_parquet["ci"]


# --- planning ---------------------------------------------------------------------------------------------------


def test_plan_sentence_for_a_target_and_a_minimum_gain(three_sizes):
    fit = three_sizes[0] / "fit"
    loaded = load_fit(fit)
    params = CurveParams(**loaded.document["curves"]["l"]["average"]["macro"]["params"])
    target = params.floor + 0.03
    [line] = plan_from_fit(fit, PlanRequest(target_loss=target, min_gain=0.002))
    expected = plan(params, target=target, tau=0.002, bootstrap=loaded.bootstrap("l", "average", "macro"),
                    joint=loaded.joint("average", "macro"))
    assert line.method == "average"
    assert line.sentence == f"at size l (0.004B); {expected.sentence}"
    experts = experts_for_target(params, target).experts
    assert f"{experts} experts reach {target:g} (predicted" in line.sentence and " ± " in line.sentence
    assert line.sentence.endswith(f"stop at {stop_at(params, 0.002)}")


def test_target_below_the_floor_is_unreachable_and_names_the_base_that_reaches_it(three_sizes):
    fit = three_sizes[0] / "fit"
    loaded = load_fit(fit)
    floor = loaded.document["curves"]["s"]["average"]["macro"]["params"]["floor"]
    target = floor - 0.01
    [line] = plan_from_fit(fit, PlanRequest(size="s", target_loss=target))
    threshold = loaded.joint("average", "macro").size_for_floor_below(target)
    assert 0.0002 < threshold < 0.004
    assert "no number of experts reaches it" in line.sentence and f"floor {floor:.4g}" in line.sentence
    assert f"a base above {threshold:.3g}B has its floor below {target:g}" in line.sentence


def test_unreachable_with_one_size_asks_for_a_size_sweep(tmp_path):
    write_table(law_rows(sizes={"s": 0.0002}), tmp_path / "sweep.parquet")
    fit_sweep(tmp_path / "sweep.parquet", tmp_path / "fit", FAST)
    [line] = plan_from_fit(tmp_path / "fit", PlanRequest(target_loss=0.1, epsilon=0.01))
    assert line.sentence.startswith("0.1 is at or below the floor")
    assert "sweep several base sizes (a joint fit) to tell which size would reach 0.1" in line.sentence
    with pytest.raises(ConfigError, match="needs a joint fit"):
        plan_from_fit(tmp_path / "fit", PlanRequest(expert_cost=1, next_size_cost=10))


def test_size_or_experts_from_costs(three_sizes):
    fit = three_sizes[0] / "fit"
    loaded = load_fit(fit)
    [line] = plan_from_fit(fit, PlanRequest(size="s", experts=3, expert_cost=1, next_size_cost=20))
    advice = size_or_experts(loaded.joint("average", "macro"), size=0.0002, experts=3, next_size=0.001,
                             expert_cost=1, next_size_cost=20)
    assert line.sentence == f"at size s (0.0002B); {advice.recommendation}"
    with pytest.raises(ConfigError, match="largest size of the fit"):
        plan_from_fit(fit, PlanRequest(expert_cost=1, next_size_cost=20))


def test_plan_bad_input(three_sizes, tmp_path):
    fit = three_sizes[0] / "fit"
    with pytest.raises(ConfigError, match="plan needs a question"):
        plan_from_fit(fit, PlanRequest())
    with pytest.raises(ConfigError, match="no method 'ties' at size l; methods are average"):
        plan_from_fit(fit, PlanRequest(method="ties", target_loss=1))
    with pytest.raises(ConfigError, match="no curve for domain 'gamma'; domains are macro, alpha, beta"):
        plan_from_fit(fit, PlanRequest(domain="gamma", target_loss=1))
    with pytest.raises(ConfigError, match="no size 'xl'"):
        plan_from_fit(fit, PlanRequest(size="xl", target_loss=1))
    with pytest.raises(ConfigError, match="no fit.json"):
        plan_from_fit(tmp_path, PlanRequest(target_loss=1))


# --- bad sweep tables -------------------------------------------------------------------------------------------


def test_missing_column_is_named(tmp_path):
    table = pa.Table.from_pylist(law_rows(sizes={"s": 0.0002})).drop_columns(["ce"])
    pq.write_table(table, tmp_path / "sweep.parquet")
    with pytest.raises(ConfigError, match="sweep.parquet: column 'ce' is missing"):
        fit_sweep(tmp_path / "sweep.parquet", tmp_path / "fit", FAST)
    assert not (tmp_path / "fit").exists()


def test_fewer_than_three_distinct_k_is_refused(tmp_path):
    write_table(law_rows(sizes={"s": 0.0002}, ks=(1, 2)), tmp_path / "sweep.parquet")
    with pytest.raises(ConfigError, match="size s, method average, macro: .*at least 3 distinct expert counts k; "
                                          "got 2"):
        fit_sweep(tmp_path / "sweep.parquet", tmp_path / "fit", FAST)
    assert list(tmp_path.iterdir()) == [tmp_path / "sweep.parquet"]  # nothing half-written


def test_nan_losses_are_dropped_with_a_count(tmp_path, caplog):
    rows = law_rows(sizes={"s": 0.0002})
    for row in rows[2:8:2]:  # the alpha rows of three subsets
        row["ce"] = float("nan")
    write_table(rows, tmp_path / "sweep.csv")
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        fit_sweep(tmp_path / "sweep.csv", tmp_path / "fit", FAST)
    assert f"dropped 3 of {len(rows)} rows with a NaN or infinite ce" in caplog.text
    assert "3 subsets lack some domains' CE" in caplog.text
    points = json.loads((tmp_path / "fit" / "fit.json").read_text())["curves"]["s"]["average"]
    assert points["macro"]["points"]["count"] == [2, 10, 10, 5, 1]
    assert points["alpha"]["points"]["count"] == [2, 10, 10, 5, 1] and points["beta"]["points"]["count"][0] == 5


def test_duplicate_rows_and_an_existing_folder_are_refused(three_sizes, tmp_path):
    rows = law_rows(sizes={"s": 0.0002})
    write_table(rows + rows[:1], tmp_path / "sweep.parquet")
    with pytest.raises(ConfigError, match="two rows for size s, method average, subset alpha, domain alpha"):
        fit_sweep(tmp_path / "sweep.parquet", tmp_path / "fit", FAST)
    folder = three_sizes[0]
    with pytest.raises(ConfigError, match="fit folder exists; pass --overwrite"):
        fit_sweep(folder / "sweep.parquet", folder / "fit", FAST)
    write_table(rows, tmp_path / "one.parquet")
    fit_sweep(tmp_path / "one.parquet", tmp_path / "fit", FAST)
    fit_sweep(folder / "sweep.parquet", tmp_path / "fit", FAST, overwrite=True)
    assert set(load_fit(tmp_path / "fit").sizes) == set(SIZES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit", "one.parquet", "sweep.parquet"]


# --- command line -----------------------------------------------------------------------------------------------


def test_cli_fit_and_plan(three_sizes, run_cli, tmp_path):
    folder, _ = three_sizes
    status, out, err = run_cli("fit", folder / "sweep.parquet", "--out", tmp_path / "fit", "--resamples", 3,
                               "--domains", "macro")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["size", "method", "R²"] and lines[1].split()[:2] == ["s", "average"]
    assert "joint average: R² " in out and "(decreasing in N)" in out
    status, out, err = run_cli("plan", tmp_path / "fit", "--size", "m", "--target-loss", 1.0, "--min-gain", 0.002)
    assert status == 0, err
    assert out.startswith("at size m (0.001B); 1 experts reach 1 (predicted ") and out.count("\n") == 1


@pytest.mark.parametrize(("args", "message"), [
    (("fit", "{tmp}/none.parquet", "--out", "{tmp}/fit"), "none.parquet: no such sweep table"),
    (("fit", "{tmp}/bad.parquet", "--out", "{tmp}/fit"), "column 'ce' is missing"),
    (("fit", "{tmp}/two_k.parquet", "--out", "{tmp}/fit"), "at least 3 distinct expert counts"),
    (("fit", "{tmp}/two_k.parquet", "--out", "{tmp}/fit", "--confidence", "2"), "arguments: confidence"),
    (("plan", "{tmp}", "--target-loss", "1"), "no fit.json"),
    (("sweep", "--zoo", "{tmp}", "--out", "{tmp}/s.csv"), "not a zoo folder"),
    (("sweep", "--zoo", "{tmp}", "--out", "{tmp}/s.csv", "--param", "ties"), "--param: expected METHOD.FIELD=VALUE"),
    (("sweep", "--zoo", "{tmp}", "--out", "{tmp}/s.csv", "--methods", "ties,ties"), "ties is listed twice"),
    (("sweep", "--zoo", "{tmp}", "--out", "{tmp}/s.txt"), "a sweep table is .parquet or .csv"),
])
def test_cli_bad_input_is_one_line_and_exit_2(run_cli, tmp_path, args, message):
    pq.write_table(pa.Table.from_pylist(law_rows(sizes={"s": 0.0002})).drop_columns(["ce"]), tmp_path / "bad.parquet")
    write_table(law_rows(sizes={"s": 0.0002}, ks=(1, 2)), tmp_path / "two_k.parquet")
    status, out, err = run_cli(*(arg.format(tmp=tmp_path) for arg in args))
    assert status == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_plan_recommends_the_method_reaching_the_target_first_and_leaves_out_one_the_law_misses(tmp_path):
    sizes = {"l": SIZES["l"]}
    worse = [row | {"method": "task_arithmetic", "ce": row["ce"] + 0.02} for row in law_rows(sizes)]
    rising = [row | {"method": "dare_ties", "ce": row["ce"] + 0.03 * row["k"] ** 2} for row in law_rows(sizes)]
    write_table(law_rows(sizes) + worse + rising, tmp_path / "sweep.parquet")
    fit_sweep(tmp_path / "sweep.parquet", tmp_path / "fit", FAST.model_copy(update={"domains": "macro"}))
    curves = load_fit(tmp_path / "fit").document["curves"]["l"]
    floor = curves["average"]["macro"]["params"]["floor"]
    target = floor + 0.03
    lines = plan_from_fit(tmp_path / "fit", PlanRequest(target_loss=target))
    assert [line.method for line in lines] == ["average", "task_arithmetic", "dare_ties", "recommended"]
    average = experts_for_target(CurveParams(**curves["average"]["macro"]["params"]), target).experts
    ta = experts_for_target(CurveParams(**curves["task_arithmetic"]["macro"]["params"]), target).experts
    assert ta > average
    recommendation = lines[-1].sentence
    assert recommendation.startswith(f"average: reaches {target:g} with {average} experts")
    assert f"task_arithmetic {ta}" in recommendation
    assert "dare_ties (R² " in recommendation and "the law does not hold for them" in recommendation
    unreachable = plan_from_fit(tmp_path / "fit", PlanRequest(target_loss=floor - 0.01))[-1].sentence
    assert unreachable.startswith(f"average: no method reaches {floor - 0.01:g}; the lowest floor (L∞ average")
