"""sce, ram and ramplus_tl: hand-worked values, edge cases, and equality with mergekit 0.1.5 on saved tensors."""

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open

from merging.methods.ram import Ram, RamPlusTl
from merging.methods.sce import Sce

NAME = "model.layers.0.mlp.up_proj.weight"
CLASSES = {cls.name: cls for cls in (Sce, Ram, RamPlusTl)}
# Made by running mergekit 0.1.5's sce_merge / ram_merge / ramplus_tl_merge on seeded random float32 tensors
# (TensorGroup.from_tensors, base first); metadata: case -> {method, params, kind, experts}.
FIXTURE = Path(__file__).parent / "fixtures" / "mergekit_group_b.safetensors"


def merge(cls, params, base, task_vectors):
    experts = [base + tv for tv in task_vectors]
    return cls(cls.Params(**params)).merge(base, experts, [1.0] * len(experts), NAME)


def test_class_attributes():
    for cls in CLASSES.values():
        assert (cls.takes_weights, cls.min_experts, cls.max_experts, cls.allows_negative_weights) == \
            (False, 1, None, False)
    assert Sce.Params().model_dump() == {"select_topk": 1.0, "int8_mask": False}
    assert RamPlusTl.Params().model_dump() == {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}
    with pytest.raises(ValidationError):
        Ram.Params(r=0.1)  # ramplus_tl's parameter, not ram's


def test_sce_sign_election_and_energy_weights():
    base = torch.full((4,), 0.5)
    # ω = (3.5, 1.75) / 5.25; Στ = (2, 0, -1, 2) elects (+, +, −, +); entry 1 keeps only τ2, entries 2, 3 one each
    merged = merge(Sce, {}, base, [torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, -1.0, -1.0])])
    assert torch.equal(merged, base + torch.tensor([1.0, 2.0, -1.0, 3.0]))
    # ω = (4.5, 1) / 5.5: entry 0 is (9/11·3 + 2/11·1) / 1; at entry 1 τ1 = 0 is erased
    merged = merge(Sce, {}, torch.zeros(2), [torch.tensor([3.0, 0.0]), torch.tensor([1.0, 1.0])])
    torch.testing.assert_close(merged, torch.tensor([29 / 11, 1.0]))


def test_sce_variance_selection():
    # Var = (1, 0, 0, 1/4): two nonzero, k = int(2·0.5) = 1 keeps entry 0; entry 2 agrees (Var 0) and is dropped
    task_vectors = [torch.tensor([1.0, 0.0, 2.0, 0.0]), torch.tensor([-1.0, 0.0, 2.0, 1.0])]
    merged = merge(Sce, {"select_topk": 0.5}, torch.zeros(4), task_vectors)
    assert torch.equal(merged, torch.tensor([1.0, 0.0, 0.0, 0.0]))  # Στ = 0 elects +
    assert torch.equal(merge(Sce, {"select_topk": 0.0}, torch.zeros(4), task_vectors), torch.zeros(4))
    assert torch.equal(merge(Sce, {"select_topk": 0.4}, torch.zeros(4), task_vectors), torch.zeros(4))  # k = 0


def test_sce_small_energies_and_weight_floor():
    # Σ mean(τ²) = 2e-7 < 1e-6: equal weights, the plain mean 4e-4 (not the energy-weighted 5.6e-4)
    merged = merge(Sce, {}, torch.zeros(2), [torch.tensor([2e-4, 0.0]), torch.tensor([6e-4, 0.0])])
    torch.testing.assert_close(merged, torch.tensor([4e-4, 0.0]))
    # τ2 alone at entry 1 with ω2 ≈ 1e-8 < 1e-6: its 1e-4 is divided by 1e-6, not by ω2
    merged = merge(Sce, {}, torch.zeros(2), [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1e-4])])
    omega = 5e-9 / (0.5 + 5e-9)
    torch.testing.assert_close(merged, torch.tensor([1.0, omega * 1e-4 / 1e-6]), rtol=1e-4, atol=0)


def test_sce_edge_cases():
    g = torch.Generator().manual_seed(0)
    base, tv = torch.randn(6, 5, generator=g), 0.1 * torch.randn(6, 5, generator=g)
    torch.testing.assert_close(merge(Sce, {}, base, [tv]), base + tv)
    torch.testing.assert_close(merge(Sce, {}, base, [tv, tv, tv]), base + tv)
    # no variance across experts: any selection below 1 keeps nothing
    assert torch.equal(merge(Sce, {"select_topk": 0.9}, base, [tv]), base)
    assert torch.equal(merge(Sce, {"select_topk": 0.9}, base, [tv, tv]), base)
    assert torch.equal(merge(Sce, {}, base, [torch.zeros(6, 5)] * 3), base)


TASK_VECTORS = [torch.tensor([1.0, 2.0, 0.0, 1e-6, 4.0, 0.0]),
                torch.tensor([3.0, 0.0, 0.0, 5.0, -2.0, 1.0]),
                torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0, 0.0])]


@pytest.mark.parametrize(("cls", "params", "expected"), [
    # entry 0: mean of three; 1, 3, 5: one expert's (τ1's 1e-6 ≤ ε at entry 3 is dropped); 2: none; 4: mean of two
    (Ram, {}, [2.0, 2.0, 0.0, 5.0, 1.0, 1.0]),
    # S, U = (2, 1), (2, 2), (1, 0): ρ = (2, 1, 1e5) capped at α = 0.2, λ = 1.02 on the unique entries 1, 3, 5
    (RamPlusTl, {}, [2.0, 2.04, 0.0, 5.1, 1.0, 1.02]),
    # λ = 1 + 0.5·ρ: 2 for τ1 (entry 1), 1.5 for τ2 (entries 3, 5)
    (RamPlusTl, {"r": 0.5, "alpha": 5.0}, [2.0, 4.0, 0.0, 7.5, 1.0, 1.5]),
    # ε = 1.5 drops τ1's 1 at entry 0 (the mean of 3 and 2) and τ2's 1 at entry 5
    (Ram, {"epsilon": 1.5}, [2.5, 2.0, 0.0, 5.0, 1.0, 0.0]),
])
def test_ram_hand_worked(cls, params, expected):
    torch.testing.assert_close(merge(cls, params, torch.zeros(6), TASK_VECTORS), torch.tensor(expected))


@pytest.mark.parametrize("cls", [Ram, RamPlusTl])
def test_ram_edge_cases(cls):
    g = torch.Generator().manual_seed(1)
    base, tv = torch.randn(6, 5, generator=g), 0.1 * torch.randn(6, 5, generator=g)
    tv[0, 0] = 1e-6  # at most ε: dropped
    expected = base + tv * (tv.abs() > 1e-5)
    torch.testing.assert_close(merge(cls, {}, base, [tv]), expected)
    torch.testing.assert_close(merge(cls, {}, base, [tv, tv, tv]), expected)
    assert torch.equal(merge(cls, {}, base, [torch.zeros(6, 5)] * 2), base)


def test_ramplus_tl_zero_epsilon_and_an_unchanged_expert_is_nan_as_in_mergekit():
    merged = merge(RamPlusTl, {"epsilon": 0.0}, torch.zeros(3), [torch.tensor([1.0, 0.0, 2.0]), torch.zeros(3)])
    assert merged.isnan().all()


def fixture_cases():
    with safe_open(FIXTURE, "pt") as f:
        for case, info in sorted(f.metadata().items()):
            info = json.loads(info)
            experts = [f.get_tensor(f"{case}/expert{i}") for i in range(info["experts"])]
            yield pytest.param(info, f.get_tensor(f"{case}/base"), experts, f.get_tensor(f"{case}/merged"), id=case)


@pytest.mark.parametrize(("info", "base", "experts", "expected"), list(fixture_cases()))
def test_equals_mergekit(info, base, experts, expected):
    cls = CLASSES[info["method"]]
    merged = cls(cls.Params(**info["params"])).merge(base, experts, [1.0] * len(experts), NAME)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
