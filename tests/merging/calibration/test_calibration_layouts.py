"""Calibration at scale: adapters factored, full experts streamed, teachers recomputed, warm starts — each
against the dense resident path it must reproduce (float32, the tiny zoo's base with its tokenizer and data)."""

import json
from pathlib import Path

import pytest
import torch

from merging import ExpertRef, MergeConfig, merge
from merging.calibration.factored import LowRankDelta, StreamedLinear
from merging.calibration.sources import StreamedVectors
from merging.io.synthetic import write_random_lora

DOMAINS = ["algebra", "code", "biology"]
FAST = {"samples_per_expert": 3, "grad_accumulation": 3, "epochs": 2, "init": 0.3, "gamma": 0.8}


@pytest.fixture(scope="module")
def adapters(tiny_zoo, tmp_path_factory) -> dict[str, Path]:
    """Three LoRA experts of the tiny base: ranks 2, 4, 3 (one rsLoRA, one without the MLP), big enough updates."""
    root = tmp_path_factory.mktemp("adapters")
    targets = [("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
               ("q_proj", "v_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")]
    return {domain: write_random_lora(tiny_zoo / "base", root / domain, seed=7 + i, rank=(2, 4, 3)[i],
                                      targets=targets[i], scale=40.0, use_rslora=i == 1)
            for i, domain in enumerate(DOMAINS)}


def calibrated(tiny_zoo: Path, experts: dict[str, Path], out: Path, method: str = "expert_merging",
               **params) -> tuple[dict, dict]:
    """(coefficients.json, calibration.json) of a merge of `experts` (name -> folder)."""
    config = MergeConfig(base=tiny_zoo / "base", method=method, seed=5,
                         experts=[ExpertRef(path=path, name=name) for name, path in experts.items()],
                         calibration={d: tiny_zoo / "data" / d / "calib.jsonl" for d in experts},
                         params=FAST | params)
    merge(config, out)
    return json.loads((out / "coefficients.json").read_text()), json.loads((out / "calibration.json").read_text())


def alpha_of(coefficients: dict) -> torch.Tensor:
    tensors = coefficients["tensors"]
    return torch.cat([torch.tensor([entry["alpha"][e] for e in coefficients["experts"]]).reshape(-1)
                      for entry in tensors.values()])


@pytest.mark.parametrize("method", ["expert_merging", "expert_merging_pp", "adamerging"])
def test_factored_adapters_learn_the_dense_paths_coefficients(tiny_zoo, adapters, tmp_path, method):
    dense, dense_report = calibrated(tiny_zoo, adapters, tmp_path / "dense", method, task_vectors="resident")
    factored, report = calibrated(tiny_zoo, adapters, tmp_path / "factored", method)
    assert (dense_report["layout"], report["layout"]) == ("resident", "factored")
    assert report["task_vectors_mb"] == 0 and 0 < report["factors_mb"] < dense_report["task_vectors_mb"] / 4
    assert [e["chunks"] for e in factored["tensors"].values()] == [e["chunks"] for e in dense["tensors"].values()]
    if method == "expert_merging_pp":
        assert max(e["chunks"] for e in factored["tensors"].values()) > 1  # row blocks of B were trained
    moved = (alpha_of(dense) - FAST["init"]).abs().max()
    assert moved > 1e-2  # the coefficients really trained
    torch.testing.assert_close(alpha_of(factored), alpha_of(dense), rtol=0, atol=1e-4)


def test_recomputed_teachers_equal_cached_ones_and_reruns_are_bit_identical(tiny_zoo, adapters, tmp_path):
    cached, cached_report = calibrated(tiny_zoo, adapters, tmp_path / "c", teachers="cached")
    recomputed, report = calibrated(tiny_zoo, adapters, tmp_path / "r", teachers="recomputed")
    assert cached_report["teachers"] == "cached" and cached_report["teacher_cache_mb"] > 0
    assert report["teachers"] == "recomputed" and report["teacher_cache_mb"] == 0
    torch.testing.assert_close(alpha_of(recomputed), alpha_of(cached), rtol=0, atol=1e-5)
    calibrated(tiny_zoo, adapters, tmp_path / "r2", teachers="recomputed")
    assert (tmp_path / "r" / "coefficients.json").read_bytes() == (tmp_path / "r2" / "coefficients.json").read_bytes()


def test_streamed_full_experts_learn_the_resident_paths_coefficients(tiny_zoo, tmp_path):
    experts = {d: tiny_zoo / "experts" / d for d in DOMAINS}
    resident, _ = calibrated(tiny_zoo, experts, tmp_path / "resident", "expert_merging_pp", task_vectors="resident")
    streamed, report = calibrated(tiny_zoo, experts, tmp_path / "streamed", "expert_merging_pp",
                                  task_vectors="streamed")
    assert report["layout"] == "streamed" and report["task_vectors_mb"] == 0 and report["streamed_tensor_mb"] > 0
    torch.testing.assert_close(alpha_of(streamed), alpha_of(resident), rtol=0, atol=1e-5)


def test_mixed_adapters_and_a_full_checkpoint(tiny_zoo, adapters, tmp_path):
    experts = {"algebra": adapters["algebra"], "code": tiny_zoo / "experts" / "code", "biology": adapters["biology"]}
    dense, _ = calibrated(tiny_zoo, experts, tmp_path / "dense", task_vectors="resident")
    factored, report = calibrated(tiny_zoo, experts, tmp_path / "mixed")
    assert report["layout"] == "factored" and report["factors_mb"] > 0 and report["task_vectors_mb"] > 0
    torch.testing.assert_close(alpha_of(factored), alpha_of(dense), rtol=0, atol=1e-4)


def test_warm_start_keeps_the_heads_coefficients_and_starts_the_new_expert_at_init(tiny_zoo, adapters, tmp_path):
    head = {d: adapters[d] for d in DOMAINS[:2]}
    calibrated(tiny_zoo, head, tmp_path / "head")
    earlier = json.loads((tmp_path / "head" / "coefficients.json").read_text())
    # a learning rate too small to move anything: what comes out is where training started
    warm, report = calibrated(tiny_zoo, adapters, tmp_path / "warm", lr=1e-9,
                              warm_start=str(tmp_path / "head" / "coefficients.json"))
    assert report["warm_start"]["new_experts"] == ["biology"]
    for name, entry in warm["tensors"].items():
        for expert in DOMAINS[:2]:
            assert entry["alpha"][expert] == pytest.approx(earlier["tensors"][name]["alpha"][expert], abs=1e-5)
        assert entry["alpha"]["biology"] == pytest.approx([FAST["init"]], abs=1e-5)


def test_a_budget_too_small_for_every_layout_is_one_line_naming_what_is_needed(tiny_zoo, adapters, tmp_path, run_cli,
                                                                               write_config):
    config = write_config(base=tiny_zoo / "base", method="expert_merging", experts=list(adapters.values()),
                          calibration={d: str(tiny_zoo / "data" / d / "calib.jsonl") for d in DOMAINS},
                          params=FAST | {"memory_budget_mb": 0.01})
    status, _, err = run_cli("merge", config, tmp_path / "out")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "params.memory_budget_mb: 0 MB is too small" in err and "needs about" in err and "blockwise" in err
    assert not (tmp_path / "out").exists()


def test_custom_gradients_match_finite_differences():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    a, b = torch.randn(7, 6, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    for rows in (1, 4):  # α per expert (scaled in the rank space), or per row of B (EM++ row blocks)
        scale = torch.randn(rows, 7, dtype=torch.float64, generator=generator, requires_grad=True)
        assert torch.autograd.gradcheck(LowRankDelta.apply, (x, a, b, scale))

    class Stored(StreamedVectors):
        def read(self, base_weight):
            return vectors

    vectors = torch.randn(3, 24, dtype=torch.float64, generator=generator)
    weight = torch.randn(4, 6, dtype=torch.float64, generator=generator)
    for chunks in (1, 3):
        alpha = torch.rand(3, chunks, dtype=torch.float64, generator=generator, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, alpha: StreamedLinear.apply(x, alpha, weight, None,
                                                                              Stored("w", [0, 1, 2], [])), (x, alpha))


def test_top_k_teachers_keep_k_tokens_and_their_kl_is_exact_at_the_whole_vocabulary(tiny_zoo, adapters, tmp_path):
    from merging.calibration.teachers import TeacherOutput, logit_kl

    generator = torch.Generator().manual_seed(1)
    teacher = TeacherOutput(torch.log_softmax(torch.randn(5, 40, generator=generator) * 3, -1), [])
    student = torch.log_softmax(torch.randn(5, 40, generator=generator), -1)
    exact = logit_kl(student, teacher)
    torch.testing.assert_close(logit_kl(student, teacher.kept(39)), exact, rtol=1e-4, atol=1e-5)  # the rest: 1 token
    assert 0 < logit_kl(student, teacher.kept(8)) < exact * 1.5  # an approximation, of the same size
    vocabulary = json.loads((tiny_zoo / "base" / "config.json").read_text())["vocab_size"]
    small, report = calibrated(tiny_zoo, adapters, tmp_path / "small", teachers="top_k", teacher_top_k=4)
    whole, whole_report = calibrated(tiny_zoo, adapters, tmp_path / "whole", teachers="cached")
    assert report["teachers"] == "top_k" and 0 < report["teacher_cache_mb"] < whole_report["teacher_cache_mb"] / 4
    assert (alpha_of(small) - alpha_of(whole)).abs().max() > 1e-3  # four tokens of a flat tiny model: another loss
    every, _ = calibrated(tiny_zoo, adapters, tmp_path / "every", teachers="top_k", teacher_top_k=vocabulary - 1)
    torch.testing.assert_close(alpha_of(every), alpha_of(whole), rtol=0, atol=1e-4)
