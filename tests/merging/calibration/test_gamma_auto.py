"""`gamma: auto`: γ chosen on held-out calibration samples, then trained on all of them; `init: auto`: ᾱ chosen as
the Task Arithmetic λ with the lowest CE on the calibration samples; the fallbacks."""

import json
import logging

import pytest
import torch

from merging.calibration.coefficients import Coefficients
from merging.calibration.gamma_choice import held_out_split
from merging.calibration.samples import Sample

DOMAINS = ["algebra", "code", "biology"]
FAST = {"samples_per_expert": 3, "grad_accumulation": 3, "epochs": 2}


@pytest.fixture()
def em_config(tiny_zoo, write_config):
    def make(**params):
        return write_config(base=tiny_zoo / "base", experts=[tiny_zoo / "experts" / d for d in DOMAINS],
                            method="expert_merging", params={**FAST, **params},
                            calibration={d: str(tiny_zoo / "data" / d / "calib.jsonl") for d in DOMAINS})
    return make


def test_each_expert_holds_out_its_last_share_and_keeps_one_to_train_on():
    samples = [Sample(expert, torch.tensor([[i]])) for expert, n in enumerate([1, 2, 3, 8]) for i in range(n)]
    trained, held = held_out_split(samples, 0.25)
    assert [(s.expert, int(s.input_ids)) for s in held] == [(1, 1), (2, 2), (3, 6), (3, 7)]
    assert len(trained) + len(held) == len(samples) and sum(s.expert == 0 for s in trained) == 1
    assert len(held_out_split(samples, 0.9)[0]) == 4  # at most n - 1 held out: one sample per expert trains


def test_auto_picks_the_gamma_with_the_lowest_held_out_ce_then_trains_on_every_sample(em_config, tmp_path, run_cli):
    status, _, err = run_cli("merge", em_config(), tmp_path / "auto")
    assert status == 0, err
    report = json.loads((tmp_path / "auto" / "calibration.json").read_text())
    choice = report["gamma_choice"]
    tried = {float(gamma): ce for gamma, ce in choice["held_out_ce"].items()}
    assert list(tried) == [0.0, 0.8, 5.0] and len(set(tried.values())) == 3  # the γ change the merge
    assert choice["chosen"] == min(tried, key=tried.get) == report["params"]["gamma"]
    assert (choice["held_out_samples"], choice["trained_on_samples"]) == (3, 6)
    assert report["samples"] == dict.fromkeys(DOMAINS, 3)  # the final training saw them all

    # the same as asking for the chosen γ: nothing of the candidates leaks into the final coefficients
    status, _, err = run_cli("merge", em_config(gamma=choice["chosen"]), tmp_path / "fixed")
    assert status == 0, err
    auto, fixed = (Coefficients.load(tmp_path / name / "coefficients.json") for name in ("auto", "fixed"))
    for name in fixed.alpha:
        assert torch.equal(auto.alpha[name], fixed.alpha[name]), name
    assert json.loads((tmp_path / "fixed" / "calibration.json").read_text())["gamma_choice"] is None


def test_expert_merging_pp_chooses_gamma_on_its_first_stage(em_config, tmp_path, run_cli):
    """EM++ scores each γ with Expert Merging (its stage 1) alone: the held-out CEs are Expert Merging's."""
    reports = {}
    for method in ("expert_merging", "expert_merging_pp"):
        config = em_config(gamma_grid=[0.0, 5.0], epochs=1)
        config.write_text(config.read_text().replace("method: expert_merging", f"method: {method}"))
        status, _, err = run_cli("merge", config, tmp_path / method)
        assert status == 0, err
        reports[method] = json.loads((tmp_path / method / "calibration.json").read_text())
    assert reports["expert_merging_pp"]["gamma_choice"] == reports["expert_merging"]["gamma_choice"]
    assert [s["name"] for s in reports["expert_merging_pp"]["stages"]] == ["expert_merging", "expert_merging_pp"]


def test_auto_init_is_the_task_arithmetic_lambda_with_the_lowest_calibration_ce(em_config, tmp_path, run_cli):
    status, _, err = run_cli("merge", em_config(gamma=0.0, init="auto", init_grid=[0.1, 0.5, 0.9]), tmp_path / "auto")
    assert status == 0, err
    report = json.loads((tmp_path / "auto" / "calibration.json").read_text())
    tried = {float(value): ce for value, ce in report["init_choice"]["ce"].items()}
    assert list(tried) == [0.1, 0.5, 0.9] and len(set(tried.values())) == 3
    assert report["init_choice"]["chosen"] == min(tried, key=tried.get) == report["params"]["init"]
    assert report["init_choice"]["samples"] == 3  # the samples gamma: auto holds out, one per expert

    # the same as asking for the chosen ᾱ
    status, _, err = run_cli("merge", em_config(gamma=0.0, init=report["params"]["init"]), tmp_path / "fixed")
    assert status == 0, err
    auto, fixed = (Coefficients.load(tmp_path / name / "coefficients.json") for name in ("auto", "fixed"))
    assert all(torch.equal(auto.alpha[name], fixed.alpha[name]) for name in fixed.alpha)


@pytest.mark.parametrize(("params", "reason"), [
    ({"samples_per_expert": 1}, "no expert has two calibration samples to hold one out"),
    ({"mode": "blockwise", "init": "auto"}, "mode blockwise has no whole model to score"),
])
def test_when_nothing_can_be_scored_auto_falls_back_to_the_papers_gamma_with_a_warning(
        em_config, tmp_path, run_cli, caplog, params, reason):
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        status, _, err = run_cli("merge", em_config(**params), tmp_path / "m")
    assert status == 0, err
    assert f"gamma: auto: {reason}; using the paper's γ = 0.8" in caplog.text
    report = json.loads((tmp_path / "m" / "calibration.json").read_text())
    assert report["gamma_choice"] == {"chosen": 0.8, "fallback": reason, "held_out_ce": {}}
    assert report["params"]["gamma"] == 0.8
    if params.get("mode") == "blockwise":
        assert f"init: auto: {reason}; using ᾱ = 0.3" in caplog.text
        assert report["init_choice"] == {"chosen": 0.3, "fallback": reason, "ce": {}}


def test_an_init_outside_0_1_in_the_grid_is_refused(em_config, tmp_path, run_cli):
    status, _, err = run_cli("merge", em_config(init="auto", init_grid=[0.5, 1.0]), tmp_path / "m")
    assert status == 2 and "params.init_grid" in err and "less than 1" in err, err
    assert not (tmp_path / "m").exists()


def test_a_negative_gamma_in_the_grid_is_refused(em_config, tmp_path, run_cli):
    status, _, err = run_cli("merge", em_config(gamma_grid=[0.0, -1.0]), tmp_path / "m")
    assert status == 2 and "merge.yaml: params.gamma_grid: every γ must be >= 0" in err
    assert not (tmp_path / "m").exists()


def test_init_auto_is_expert_mergings_default_and_not_adamergings():
    from merging.calibration.params import params_for

    assert params_for("expert_merging")().init == params_for("expert_merging_pp")().init == "auto"
    assert params_for("adamerging")().init == 0.3  # the paper's


def test_the_default_init_falls_back_in_blockwise_mode_without_a_warning(em_config, tmp_path, run_cli, caplog):
    with caplog.at_level(logging.INFO, logger="mergeplan"):
        status, _, err = run_cli("merge", em_config(mode="blockwise", gamma=0.8), tmp_path / "m")
    assert status == 0, err
    report = json.loads((tmp_path / "m" / "calibration.json").read_text())
    assert report["init_choice"]["chosen"] == report["params"]["init"] == 0.3
    notes = [r for r in caplog.records if r.getMessage().startswith("init: auto: mode blockwise")]
    assert [r.levelno for r in notes] == [logging.INFO]
