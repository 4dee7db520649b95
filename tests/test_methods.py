"""Each merge method's fold against the spec's formulas (tests/reference.py), plus hand-worked cases."""

import pytest
import reference
import torch

from merging.errors import ConfigError
from merging.methods import METHODS, build_method
from merging.methods.sparsify import dare_drop_, magnitude_trim_, top_magnitude_mask

NAME = "model.layers.0.mlp.up_proj.weight"


def fold(method_name, params, base, experts, weights, seed=0, name=NAME):
    method = build_method(method_name, params, seed)
    state = {key: torch.zeros_like(base) for key in method.state_names}
    for index, (expert, weight) in enumerate(zip(experts, weights, strict=True)):
        method.add(state, method.sparsify(expert - base, name, index), weight)
    return base + method.delta(state, sum(weights))


@pytest.fixture()
def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(48, 40, generator=g).to(torch.bfloat16).float()
    experts = [(base + 0.1 * torch.randn(48, 40, generator=g)).to(torch.bfloat16).float() for _ in range(3)]
    return base, experts


def test_registry_has_the_five_methods():
    assert list(METHODS) == ["average", "task_arithmetic", "ties", "dare_linear", "dare_ties"]


@pytest.mark.parametrize("size", [20, 100, 4096, 100_000])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
def test_top_magnitude_mask_equals_stable_sort_with_many_ties(size, density):
    # bf16 values repeat often, so the threshold value is usually shared by several entries
    magnitudes = torch.randn(size, generator=torch.Generator().manual_seed(size)).to(torch.bfloat16).float().abs()
    keep = int(density * size)
    expected = torch.zeros(size, dtype=torch.bool)
    expected[torch.argsort(magnitudes, descending=True, stable=True)[:keep]] = True
    mask = top_magnitude_mask(magnitudes, keep)
    assert int(mask.sum()) == keep
    assert torch.equal(mask, expected)


def test_magnitude_trim_edge_cases():
    delta = torch.tensor([0.5, -2.0, 1.0, 0.0])
    assert torch.equal(magnitude_trim_(delta.clone(), 0.5), torch.tensor([0.0, -2.0, 1.0, 0.0]))
    assert torch.equal(magnitude_trim_(delta.clone(), 1.0), delta)
    assert torch.equal(magnitude_trim_(delta.clone(), 0.2), torch.zeros(4))  # int(0.8) = 0 entries kept
    assert torch.equal(magnitude_trim_(torch.zeros(5), 0.4), torch.zeros(5))


def test_average_and_task_arithmetic_match_spec(tensors):
    base, experts = tensors
    weights = [1.0, 0.5, 2.0]
    torch.testing.assert_close(fold("average", {}, base, experts, weights),
                               reference.average(base, experts, weights), rtol=0, atol=1e-6)
    for params in ({"lambda": 0.8}, {"lambda": 0.8, "normalize": True}):
        expected = reference.linear(base, experts, weights, 0.8, params.get("normalize", False))
        torch.testing.assert_close(fold("task_arithmetic", params, base, experts, weights), expected,
                                   rtol=0, atol=1e-6)


def test_task_arithmetic_accepts_negative_weights(tensors):
    base, experts = tensors
    merged = fold("task_arithmetic", {}, base, experts[:2], [1.0, -1.0])
    torch.testing.assert_close(merged, base + experts[0] - experts[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_spec(tensors, density):
    base, experts = tensors
    weights = [1.0, 0.5, 2.0]
    torch.testing.assert_close(fold("ties", {"density": density, "lambda": 0.9}, base, experts, weights),
                               reference.ties(base, experts, weights, density, 0.9), rtol=0, atol=1e-6)


def test_ties_by_hand():
    base = torch.zeros(5)
    first = torch.tensor([3.0, -1.0, 0.0, 2.0, 1.0])
    second = torch.tensor([-1.0, -2.0, 0.0, 2.0, -1.0])
    # sums 2, -3, 0, 4, 0 -> signs +, -, none, +, none; disjoint means 3, -1.5, 0, 2, 0
    merged = fold("ties", {"density": 1.0}, base, [first, second], [1.0, 1.0])
    assert torch.equal(merged, torch.tensor([3.0, -1.5, 0.0, 2.0, 0.0]))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_methods_match_spec(tensors, method):
    base, experts = tensors
    weights = [1.0, 0.5, 2.0]
    merged = fold(method, {"density": 0.3}, base, experts, weights, seed=7)
    expected = getattr(reference, method)(base, experts, weights, 0.3, 7, NAME)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


def test_dare_is_seeded_per_tensor_and_expert_not_by_call_order():
    delta = torch.ones(200, 100)
    first = dare_drop_(delta.clone(), 0.25, 3, "a", 0)
    dare_drop_(delta.clone(), 0.25, 3, "b", 0)  # another tensor in between changes nothing
    assert torch.equal(first, dare_drop_(delta.clone(), 0.25, 3, "a", 0))
    assert not torch.equal(first, dare_drop_(delta.clone(), 0.25, 4, "a", 0))
    assert not torch.equal(first, dare_drop_(delta.clone(), 0.25, 3, "a", 1))
    assert set(first.unique().tolist()) == {0.0, 4.0}  # kept entries divided by the density
    assert abs(float((first != 0).float().mean()) - 0.25) < 0.02


@pytest.mark.parametrize(("params", "field"), [
    ({"density": 0}, "params.density"), ({"density": 1.5}, "params.density"),
    ({"density": -0.1}, "params.density"), ({}, "params.density"), ({"density": 0.5, "gamma": 1}, "params.gamma"),
])
def test_invalid_params_name_the_field(params, field):
    with pytest.raises(ConfigError, match=f"merge.yaml: {field}"):
        build_method("ties", params, source="merge.yaml")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown method 'slerp'; choose one of average, task_arithmetic"):
        build_method("slerp", {})
