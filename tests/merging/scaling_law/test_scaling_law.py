"""The merging scaling law: fits recover known parameters, planning rules match hand-worked cases."""

import itertools
import logging

import numpy as np
import pytest

from merging.errors import ConfigError
from merging.scaling_law.curve import (
    CurveParams,
    bootstrap_curve,
    fit_curve,
    forecast_from_three_points,
    summarise_by_k,
)
from merging.scaling_law.joint import JointParams, fit_joint
from merging.scaling_law.planning import (
    experts_for_epsilon,
    experts_for_target,
    fitted_realisation,
    marginal_gain,
    plan,
    realisation,
    size_or_experts,
    stop_at,
)
from merging.scaling_law.plots import plot_floor_vs_size, plot_loss_vs_experts, plot_residuals, plot_spread_vs_experts
from merging.scaling_law.variance import fit_variance_law, subset_variance

POOL = 9
PAPER_STYLE = CurveParams(floor=0.74, amplitude=0.08, offset=0.25)
JOINT = JointParams(floor_limit=0.3, floor_scale=0.25, floor_exponent=0.4, amplitude_scale=0.07,
                    amplitude_exponent=0.1, offset=0.25)
SIZES = (0.5, 1.5, 7.0)


def all_subsets(params: CurveParams, seed: int, noise: float = 0.002) -> tuple[list[int], list[float]]:
    """Every C(9, k) subset: the law, plus each expert's own effect averaged over the subset, plus small noise."""
    rng = np.random.default_rng(seed)
    effects = rng.normal(0, 0.02, POOL)
    k_rows, loss_rows = [], []
    for k in range(1, POOL + 1):
        for subset in itertools.combinations(range(POOL), k):
            k_rows.append(k)
            loss_rows.append(float(params.loss(k)) + effects[list(subset)].mean() - effects.mean()
                             + rng.normal(0, noise))
    return k_rows, loss_rows


def joint_rows(noise: float, seed: int = 0) -> tuple[list[float], list[int], list[float]]:
    rng = np.random.default_rng(seed)
    rows = [(n, k, float(JOINT.loss(n, k)) + rng.normal(0, noise))
            for n in SIZES for k in range(1, POOL + 1) for _ in range(20 if noise else 1)]
    n, k, loss = zip(*rows, strict=True)
    return list(n), list(k), list(loss)


@pytest.fixture(scope="module")
def subsets():
    return all_subsets(PAPER_STYLE, seed=0)


@pytest.fixture(scope="module")
def fit(subsets):
    return fit_curve(*subsets)


# --- per-size fit ---------------------------------------------------------------------------------------------


def test_fit_recovers_paper_style_parameters(fit):
    assert fit.params.floor == pytest.approx(0.74, abs=0.003)
    assert fit.params.amplitude == pytest.approx(0.08, abs=0.008)
    assert fit.params.offset == pytest.approx(0.25, abs=0.15)
    assert fit.r_squared > 0.98
    assert list(fit.summary.k) == list(range(1, 10))
    assert list(fit.summary.count) == [9, 36, 84, 126, 126, 84, 36, 9, 1]
    assert np.isnan(fit.summary.std[-1]) and np.all(fit.summary.std[:-1] > 0)


def test_fit_on_exact_means_is_exact():
    k = np.arange(1, 10)
    fit = fit_curve(k, PAPER_STYLE.loss(k))
    assert (fit.params.floor, fit.params.amplitude, fit.params.offset) == pytest.approx((0.74, 0.08, 0.25), abs=1e-7)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-12)


def test_fit_recovers_a_curve_with_zero_offset_and_a_large_amplitude():
    k = np.repeat(np.arange(1, 10), 30)
    truth = CurveParams(1.2, 0.9, 0.0)
    loss = truth.loss(k) + np.random.default_rng(3).normal(0, 0.01, k.size)
    fit = fit_curve(k, loss)
    assert fit.params.floor == pytest.approx(1.2, abs=0.01)
    assert fit.params.amplitude == pytest.approx(0.9, abs=0.03)
    assert fit.params.offset == pytest.approx(0.0, abs=0.05)


def test_fit_minimises_the_k_weighted_squared_error():
    k = np.repeat(np.arange(1, 10), 5)
    loss = PAPER_STYLE.loss(k) + np.random.default_rng(2).normal(0, 0.004, k.size)
    fit = fit_curve(k, loss)
    means = fit.summary.mean

    def weighted_error(floor: float, amplitude: float, offset: float) -> float:
        return float(np.sum(fit.summary.k * (CurveParams(floor, amplitude, offset).loss(fit.summary.k) - means) ** 2))

    best = (fit.params.floor, fit.params.amplitude, fit.params.offset)
    assert all(0 < value < 100 for value in best)  # interior, so the weighted gradient must vanish
    step = 1e-6
    for index in range(3):
        up, down = list(best), list(best)
        up[index] += step
        down[index] -= step
        assert (weighted_error(*up) - weighted_error(*down)) / (2 * step) == pytest.approx(0, abs=1e-7)


# --- bootstrap ------------------------------------------------------------------------------------------------


def test_bootstrap_is_deterministic_per_seed_and_covers_the_truth(fit):
    first = bootstrap_curve(fit, resamples=60, seed=7)
    again = bootstrap_curve(fit, resamples=60, seed=7)
    other = bootstrap_curve(fit, resamples=60, seed=8)
    assert np.array_equal(first.samples, again.samples)
    assert first.low == again.low and first.high == again.high
    assert not np.array_equal(first.samples, other.samples)
    assert first.samples.shape == (60, 3)
    assert first.low.floor < 0.74 < first.high.floor
    assert first.low.amplitude < 0.08 < first.high.amplitude
    low, high = first.prediction_band([1, 5, 9])
    assert np.all(low < fit.params.loss([1, 5, 9])) and np.all(fit.params.loss([1, 5, 9]) < high)
    assert 0 < first.half_width(8) < 0.005


def test_bootstrap_refuses_means_only():
    k = np.arange(1, 10)
    with pytest.raises(ConfigError, match="per-subset losses"):
        bootstrap_curve(fit_curve(k, PAPER_STYLE.loss(k)))


# --- variance law ---------------------------------------------------------------------------------------------


def test_variance_law_recovers_the_finite_pool_constant():
    k = np.arange(1, POOL)
    noise = 1 + 0.03 * np.random.default_rng(1).standard_normal(k.size)
    law = fit_variance_law(k, 4e-4 * (1 / k - 1 / POOL) * noise, pool_size=POOL)
    assert law.finite_pool_constant == pytest.approx(4e-4, rel=0.03)
    assert law.finite_pool_r_squared > 0.99
    # c/k ignores the pool, so it fits worse and with a smaller constant
    assert law.plain_r_squared < law.finite_pool_r_squared
    assert law.plain_constant < law.finite_pool_constant
    assert law.finite_pool_variance(POOL) == pytest.approx(0.0)


def test_variance_law_from_the_spread_over_all_subsets(fit):
    # all C(9, k) subsets were measured, so the spread is over the whole population of subsets and follows
    # c·(1/k − 1/9) with c the variance of the experts' own effects (plus a little independent noise)
    effects = np.random.default_rng(0).normal(0, 0.02, POOL)  # the first draw of all_subsets(seed=0)
    variance = subset_variance(fit.summary, pool_size=POOL)
    assert variance[-1] == 0.0
    law = fit_variance_law(fit.summary.k, variance, pool_size=POOL)
    assert law.finite_pool_constant == pytest.approx(effects.var(ddof=1), rel=0.05)
    assert law.finite_pool_r_squared > 0.99


# --- three-point forecast -------------------------------------------------------------------------------------


def test_three_point_forecast_is_exact_on_law_data():
    k = np.repeat(np.arange(1, 10), 3)
    forecast = forecast_from_three_points(k, PAPER_STYLE.loss(k))
    assert forecast.pool_size == 9
    assert abs(forecast.relative_error_at_pool) < 1e-6
    assert forecast.predicted == pytest.approx(forecast.measured, rel=1e-6)
    assert forecast.params.offset == pytest.approx(0.25, abs=1e-5)


def test_three_point_forecast_needs_k_1_2_4():
    k = [1, 2, 3, 5, 9]
    with pytest.raises(ConfigError, match=r"k = \[4\]"):
        forecast_from_three_points(k, PAPER_STYLE.loss(k))


# --- joint fit ------------------------------------------------------------------------------------------------


def test_joint_fit_recovers_six_parameters_from_exact_data():
    joint = fit_joint(*joint_rows(noise=0.0))
    got = joint.params
    expected = (0.3, 0.25, 0.4, 0.07, 0.1, 0.25)
    assert (got.floor_limit, got.floor_scale, got.floor_exponent, got.amplitude_scale, got.amplitude_exponent,
            got.offset) == pytest.approx(expected, abs=1e-5)
    assert joint.r_squared == pytest.approx(1.0, abs=1e-10)


def test_joint_fit_recovers_floor_and_amplitude_at_each_size_from_noisy_data():
    joint = fit_joint(*joint_rows(noise=0.003, seed=5))
    assert joint.r_squared > 0.99
    floors = joint.params.floor(SIZES)
    assert floors == pytest.approx(JOINT.floor(SIZES), abs=0.003)
    assert joint.params.amplitude(SIZES) == pytest.approx(JOINT.amplitude(SIZES), rel=0.12)
    assert np.all(np.diff(floors) < 0)


def test_joint_fit_refuses_one_size():
    n, k, loss = joint_rows(noise=0.0)
    one = [i for i, size in enumerate(n) if size == 0.5]
    with pytest.raises(ConfigError, match="at least 2 distinct base sizes; got 1"):
        fit_joint([n[i] for i in one], [k[i] for i in one], [loss[i] for i in one])


# --- planning -------------------------------------------------------------------------------------------------


def test_paper_worked_example_code_domain():
    code = JointParams(floor_limit=0.0, floor_scale=0.0, floor_exponent=0.0, amplitude_scale=0.068,
                       amplitude_exponent=0.115, offset=0.25)
    assert experts_for_epsilon(code.curve_at(0.5), 0.01) == 8
    assert experts_for_epsilon(code.curve_at(32), 0.01) == 5


def test_experts_for_epsilon_rounds_up_and_is_at_least_one():
    assert experts_for_epsilon(CurveParams(0.5, 0.07, 0.0), 0.01) == 7  # 7.000000000000001 on floats
    assert experts_for_epsilon(CurveParams(0.5, 0.071, 0.0), 0.01) == 8
    assert experts_for_epsilon(CurveParams(0.5, 0.001, 0.5), 0.01) == 1


def test_reachable_target():
    answer = experts_for_target(CurveParams(1.0, 0.5, 0.0), target=1.1)
    assert answer.reachable and answer.experts == 5
    assert CurveParams(1.0, 0.5, 0.0).loss(answer.experts) <= 1.1 + 1e-12


def test_target_below_floor_is_unreachable_and_a_bigger_base_is_named():
    at_half = JOINT.curve_at(0.5)  # floor 0.3 + 0.25 * 0.5^-0.4 = 0.6299
    alone = experts_for_target(at_half, target=0.55)
    assert not alone.reachable and alone.experts is None
    assert "0.6299" in alone.reason and "bigger base" in alone.reason
    # 0.3 + 0.25 N^-0.4 < 0.55  <=>  N > 1
    with_joint = experts_for_target(at_half, target=0.55, joint=JOINT)
    assert with_joint.size_threshold == pytest.approx(1.0)
    assert "above 1B" in with_joint.reason
    assert JOINT.floor(1.01) < 0.55 < JOINT.floor(0.99)
    hopeless = experts_for_target(at_half, target=0.29, joint=JOINT)
    assert hopeless.size_threshold is None and "no base size" in hopeless.reason


@pytest.mark.parametrize("amplitude, offset, tau", [(0.08, 0.25, 0.002), (0.5, 0.0, 0.001), (1.0, 3.0, 0.05),
                                                    (0.02, 0.0, 0.5), (1.0, 0.0, 1 / 6)])
def test_stop_rule_agrees_with_marginal_gain(amplitude, offset, tau):
    params = CurveParams(0.7, amplitude, offset)
    k = stop_at(params, tau)
    assert marginal_gain(params, k) < tau
    assert k == 1 or marginal_gain(params, k - 1) >= tau


def test_stop_rule_by_hand():
    assert stop_at(CurveParams(0.0, 1.0, 0.0), 0.1) == 3  # gains 1/6, 1/12: the 4th gains 0.083 < 0.1
    # the root −½ + sqrt(¼ + 6) = 2 is whole: the 3rd expert gains exactly τ = 1/6, which is not below τ
    assert stop_at(CurveParams(0.0, 1.0, 0.0), 1 / 6) == 3
    assert marginal_gain(CurveParams(0.0, 1.0, 0.0), 2) == pytest.approx(1 / 6)


def test_realised_fraction_on_fitted_curve_by_hand():
    # L = 1/k, M = 9: R(k) = (1 − 1/k)·9/8, so R(3) = 0.75, R(4) = 0.84375, R(5) = 0.9 exactly
    result = fitted_realisation(CurveParams(0.0, 1.0, 0.0), pool_size=9)
    assert result.fraction[[2, 3, 4]] == pytest.approx([0.75, 0.84375, 0.9])
    assert (result.k80, result.k90) == (4, 5)


def test_realised_fraction_on_measured_means_by_hand():
    summary = summarise_by_k([1, 1, 2, 3, 4, 5], [0.9, 1.1, 0.6, 0.5, 0.45, 0.4])
    result = realisation(summary.k, summary.mean)
    assert result.fraction == pytest.approx([0, 4 / 6, 5 / 6, 5.5 / 6, 1])
    assert (result.k80, result.k90) == (3, 4)


def test_realised_fraction_that_is_exactly_the_level_on_paper_counts():
    # (0.7 − 0.61) / (0.7 − 0.6) is 0.9 on paper but 0.8999999999999999 in floats
    result = realisation([1, 2, 3], [0.7, 0.61, 0.6])
    assert result.k90 == 2


def test_size_or_experts():
    args = {"size": 0.5, "experts": 4, "next_size": 1.5}
    cheap_experts = size_or_experts(JOINT, **args, expert_cost=1.0, next_size_cost=100.0)
    slope = 0.07 * 0.5**-0.1 / (4 + 0.25) ** 2
    assert cheap_experts.expert_gain_per_cost == pytest.approx(slope)
    assert cheap_experts.size_gain_per_cost == pytest.approx(float(JOINT.loss(0.5, 4) - JOINT.loss(1.5, 4)) / 100)
    assert cheap_experts.recommendation.startswith("add experts")
    dear_experts = size_or_experts(JOINT, **args, expert_cost=100.0, next_size_cost=1.0)
    assert dear_experts.recommendation.startswith("move to the 1.5B base")


def test_plan_sentence():
    params = CurveParams(1.85, 0.4, 0.0)  # reaches 1.9 at k = 8; gains 0.4/56 = 0.0071, then 0.4/72 = 0.0056
    answer = plan(params, target=1.9, tau=0.006)
    assert answer.sentence == "8 experts reach 1.9 (predicted 1.9); the 9th would gain 0.0056 < 0.006: stop at 8"
    assert answer.stop_at == 8 and answer.target.experts == 8


def test_plan_with_bootstrap_and_unreachable_target(fit):
    bootstrap = bootstrap_curve(fit, resamples=30, seed=0)
    answer = plan(fit.params, target=0.7, epsilon=0.01, bootstrap=bootstrap, joint=JOINT)
    assert answer.sentence.startswith("0.7 is at or below the floor")
    assert " ± " in answer.sentence and "come within 0.01 of the floor" in answer.sentence
    with pytest.raises(ConfigError, match="target"):
        plan(fit.params)


# --- bad input ------------------------------------------------------------------------------------------------


def test_fewer_than_three_distinct_k_is_refused():
    with pytest.raises(ConfigError, match="at least 3 distinct expert counts"):
        fit_curve([1, 1, 2, 2], [0.9, 0.8, 0.7, 0.75])


def test_non_finite_losses_are_dropped_with_a_warning(caplog):
    k = np.arange(1, 10)
    loss = PAPER_STYLE.loss(k)
    loss[[2, 5]] = [np.nan, np.inf]
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        fit = fit_curve(k, loss)
    assert "dropped 2 of 9 rows" in caplog.text
    assert list(fit.summary.k) == [1, 2, 4, 5, 7, 8, 9]
    assert fit.params.floor == pytest.approx(0.74, abs=1e-6)


@pytest.mark.parametrize("k, loss, message", [([1, 2.5, 3], [1, 1, 1], "whole numbers"),
                                              ([0, 1, 2], [1, 1, 1], "whole numbers"),
                                              ([1, 2, 3], [1, 1], "2 losses; pass one of each per row")])
def test_malformed_rows_are_refused(k, loss, message):
    with pytest.raises(ConfigError, match=message):
        fit_curve(k, loss)


def test_other_bad_arguments_are_refused(fit):
    with pytest.raises(ConfigError, match="offset_max must be >= 0"):
        fit_curve([1, 2, 3], [1.0, 0.9, 0.85], offset_max=-1)
    with pytest.raises(ConfigError, match="one loss per k"):
        realisation([1, 1, 2, 3], [1.0, 1.1, 0.9, 0.85])
    with pytest.raises(ConfigError, match="smaller than the largest k"):
        fit_variance_law([1, 2, 9], [3.0, 2.0, 0.0], pool_size=8)
    with pytest.raises(ConfigError, match="epsilon must be > 0"):
        experts_for_epsilon(fit.params, 0.0)
    with pytest.raises(ConfigError, match="tau must be > 0"):
        stop_at(fit.params, -0.1)


# --- plots ----------------------------------------------------------------------------------------------------


def test_plots_write_png_files(tmp_path, fit):
    bootstrap = bootstrap_curve(fit, resamples=20, seed=0)
    law = fit_variance_law(fit.summary.k, subset_variance(fit.summary, POOL), pool_size=POOL)
    joint = fit_joint(*joint_rows(noise=0.0))
    paths = [
        plot_loss_vs_experts({"average": fit}, tmp_path / "loss.png", bootstraps={"average": bootstrap}),
        plot_residuals({"average": fit}, tmp_path / "residuals.png"),
        plot_spread_vs_experts({"average": fit}, {"average": law}, tmp_path / "spread.png"),
        plot_floor_vs_size(joint, tmp_path / "floor.png", per_size_floors={0.5: 0.63, 7.0: 0.41}),
    ]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
