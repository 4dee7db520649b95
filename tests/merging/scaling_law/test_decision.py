"""The stop / continue rule (merging.scaling_law.decision) and its backtest over arrival orders
(merging.scaling_law.backtest)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from merging.scaling_law.backtest import backtest, macro_by_subset
from merging.scaling_law.curve import CurveParams
from merging.scaling_law.decision import DecisionRule, decide
from merging.scaling_law.planning import marginal_gain
from merging.sweep.table import SUBSET_SEPARATOR

LAW = CurveParams(floor=0.5, amplitude=0.1, offset=0.2)
RULE = DecisionRule(min_gain=0.002, resamples=50)


def law_points(n: int, noise: float = 0.0, seed: int = 0) -> list[tuple[int, float]]:
    k = np.arange(1, n + 1)
    loss = LAW.loss(k) + np.random.default_rng(seed).normal(0, noise, n)
    return list(zip(k.tolist(), loss.tolist(), strict=True))


def test_stops_only_when_the_whole_band_is_below_min_gain():
    points = law_points(8, noise=0.0005)
    verdict = decide(points, 8, points[-1][1], RULE)
    assert verdict.action == "stop"
    low, high = verdict.gain_band
    assert low <= verdict.predicted_gain <= high < RULE.min_gain
    assert verdict.predicted_gain == pytest.approx(float(marginal_gain(LAW, 8)), rel=0.1)
    assert "entirely below min_gain 0.002" in verdict.reason


def test_continues_when_the_whole_band_is_above_min_gain():
    points = law_points(5, noise=0.0005)
    verdict = decide(points, 5, points[-1][1], RULE)
    assert verdict.action == "continue"
    assert verdict.gain_band[0] > RULE.min_gain


def test_uncertain_when_the_band_straddles_min_gain():
    points = law_points(6, noise=0.004, seed=3)
    verdict = decide(points, 6, points[-1][1], DecisionRule(min_gain=0.0022))
    low, high = verdict.gain_band
    assert low < 0.0022 < high
    assert verdict.action == "uncertain" and "straddles" in verdict.reason


def test_three_points_fit_exactly_so_a_small_gain_is_uncertain_not_stop():
    points = law_points(3)
    verdict = decide(points, 3, points[-1][1], DecisionRule(min_gain=0.01))  # gain of expert 4 is 0.0069
    assert verdict.action == "uncertain"
    assert verdict.gain_band is None and "no residual left" in verdict.reason


@pytest.mark.parametrize(("losses", "why"), [
    ([1.0, 0.9, 0.85, 0.9, 1.0, 1.2], "R²"),  # DARE-TIES at λ 1: worse with every expert
    ([1.0, 0.95, 0.97, 0.94, 0.96, 0.95], "R²"),  # TIES at λ 1: flat, not monotone
    ([1.0, 0.8, 0.7, 0.65, 0.62, 0.6, 0.601, 0.603], "rose over the last 2 arrivals"),
])
def test_points_that_do_not_follow_the_law_give_law_fails_not_stop(losses, why):
    points = list(enumerate(losses, start=1))
    verdict = decide(points, len(losses), losses[-1], RULE)
    assert verdict.action == "law_fails"
    assert why in verdict.reason and "keep measuring" in verdict.reason


def test_target_met_stops_and_too_few_points_continue():
    assert decide([(1, 0.7)], 1, 0.7, DecisionRule(target_loss=0.8)).action == "stop"
    verdict = decide([(1, 0.7), (2, 0.65)], 2, 0.65, DecisionRule(target_loss=0.6))
    assert verdict.action == "continue" and "target 0.6 not met (0.6500)" in verdict.reason


def test_the_band_is_seeded():
    points = law_points(6, noise=0.002)
    bands = [decide(points, 6, points[-1][1], DecisionRule(seed=seed)).gain_band for seed in (0, 0, 1)]
    assert bands[0] == bands[1] != bands[2]


def synthetic_sweep(names: list[str], loss_of) -> dict[str, list]:
    columns = {"size": [], "method": [], "subset": [], "ce": []}
    for k in range(1, len(names) + 1):
        for subset in itertools.combinations(names, k):
            for domain_shift in (-0.01, 0.01):  # two domains, whose mean is the subset's loss
                columns["size"].append("s")
                columns["method"].append("m")
                columns["subset"].append(SUBSET_SEPARATOR.join(subset))
                columns["ce"].append(loss_of(subset) + domain_shift)
    return columns


def test_backtest_on_law_following_subsets_stops_near_the_true_stop_point():
    names = [f"e{i}" for i in range(7)]
    effect = dict(zip(names, np.random.default_rng(1).normal(0, 0.0005, len(names)), strict=True))
    macro = macro_by_subset(synthetic_sweep(names, lambda s: float(LAW.loss(len(s))) + np.mean(
        [effect[n] for n in s])), "s", "m")
    result = backtest(macro, "m", DecisionRule(min_gain=0.004, resamples=50), orders=6, seed=0)
    summary = result.summary()
    # gain(k) = 0.1/((k+.2)(k+1.2)): 0.0045 at k=4, 0.0036 at k=5, so the rule should stop at 5 (or 6)
    assert set(result.stop_k) <= {5, 6}
    assert summary["mean_regret"] < 0.002
    assert sum(sum(cell.values()) for cell in result.confusion.values()) == 6 * 6
    assert summary["forecast_mean_abs_error"][4] < 0.01
    assert result.final_loss == pytest.approx(float(LAW.loss(7)) + np.mean(list(effect.values())))


def test_backtest_flags_a_method_that_gets_worse_with_experts():
    names = [f"e{i}" for i in range(6)]
    macro = macro_by_subset(synthetic_sweep(names, lambda s: 1.0 + 0.05 * len(s) ** 1.5), "s", "m")
    result = backtest(macro, "m", RULE, orders=4, seed=0)
    assert result.confusion["stop"] == {"worth": 0, "not_worth": 0}
    assert result.confusion["law_fails"]["not_worth"] > 0
    assert result.legacy_confusion["stop"]["not_worth"] > 0  # the old rule stopped, on a curve it cannot fit
    assert result.stop_k == [6, 6, 6, 6]


def test_backtest_names_a_missing_subset():
    names = [f"e{i}" for i in range(4)]
    macro = macro_by_subset(synthetic_sweep(names, lambda s: 1.0 / len(s)), "s", "m")
    del macro["e0+e1"]
    with pytest.raises(Exception, match=r"subset e0\+e1 .* is not in the sweep; sweep with --design diverse"):
        backtest(macro, "m", RULE, orders=4, seed=0)


def test_plan_and_plot_show_the_new_point_against_the_curve_and_its_band(tmp_path, monkeypatch):
    from tasks.decide import LawJob, decide_job

    monkeypatch.setenv("MERGEPLAN_STATE_DIR", str(tmp_path))
    points = law_points(6, noise=0.002)
    k, loss = points[-1]
    decision = decide_job(LawJob(method="ties", points=points, experts=k, loss=loss, rule=RULE))
    verdict = decide(points, k, loss, RULE)
    rows = [line for line in decision.plan_markdown.splitlines() if line.startswith(f"| {k} |")]
    assert rows == [f"| {k} | {loss:.4f} | this run |"]
    assert f"this run's point is {loss - float(verdict.fit.params.loss(k)):+.4f} off the curve" in \
        decision.plan_markdown
    low, high = verdict.bootstrap.prediction_band(k + 1)
    predicted = float(verdict.fit.params.loss(k + 1))
    assert low[0] <= predicted <= high[0]
    assert (f"Predicted L({k + 1}) = {predicted:.4f}, 90% band [{low[0]:.4f}, {high[0]:.4f}]"
            in decision.plan_markdown)
    assert decision.plot is not None and decision.plot.stat().st_size > 10_000
