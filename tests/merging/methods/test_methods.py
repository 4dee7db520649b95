"""Each merge method's fold against the spec's formulas (tests/reference.py), plus hand-worked cases."""

import re

import pytest
import reference
import torch

from merging.errors import ConfigError
from merging.methods import METHODS, build_method
from merging.methods.sparsify import dare_drop_, della_drop_, magnitude_trim_, outlier_trim_, top_magnitude_mask

NAME = "model.layers.0.mlp.up_proj.weight"


def fold(method_name, params, base, experts, weights, seed=0, name=NAME):
    method = build_method(method_name, params, seed)
    state = {key: base.new_zeros(method.state_shape(key, base.shape)) for key in method.state_names}
    for index, (expert, weight) in enumerate(zip(experts, weights, strict=True)):
        method.add(state, method.sparsify(expert - base, name, index), weight)
    return base + method.delta(state, sum(weights), base)


@pytest.fixture()
def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(48, 40, generator=g).to(torch.bfloat16).float()
    experts = [(base + 0.1 * torch.randn(48, 40, generator=g)).to(torch.bfloat16).float() for _ in range(3)]
    return base, experts


def test_registry_has_the_eleven_methods():
    assert list(METHODS) == ["average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                             "breadcrumbs_ties", "della", "della_linear", "model_stock", "slerp"]


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
    # int(0.8) = 0, but a positive density keeps at least one entry (mergekit's rule)
    assert torch.equal(magnitude_trim_(delta.clone(), 0.2), torch.tensor([0.0, -2.0, 0.0, 0.0]))
    # rescale: what is kept is scaled back to the L1 norm before the trim (3.5 / 3)
    rescaled = magnitude_trim_(delta.clone(), 0.5, rescale=True)
    assert torch.allclose(rescaled, torch.tensor([0.0, -2.0, 1.0, 0.0]) * 3.5 / 3)
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
    # sums 2, -3, 0, 4, 0 -> signs +, -, + (a zero sum elects +, as mergekit), +, +; disjoint means 3, -1.5, 0, 2, 1
    merged = fold("ties", {"density": 1.0}, base, [first, second], [1.0, 1.0])
    assert torch.equal(merged, torch.tensor([3.0, -1.5, 0.0, 2.0, 1.0]))
    # normalize: false (mergekit's default for dare_ties and breadcrumbs_ties): the elected entries' sum
    summed = fold("ties", {"density": 1.0, "normalize": False}, base, [first, second], [1.0, 1.0])
    assert torch.equal(summed, torch.tensor([3.0, -3.0, 0.0, 4.0, 1.0]))


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
    with pytest.raises(ConfigError, match="unknown method 'frankenmerge'; choose one of average, task_arithmetic"):
        build_method("frankenmerge", {})


def test_breadcrumbs_by_hand():
    delta = torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.0, 0.1, -0.2, 0.3])
    # gamma 0.1 cuts the largest entry (5), density 0.3 keeps the next three (-4, 3, -2)
    expected = torch.tensor([0.0, -4.0, 3.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(outlier_trim_(delta.clone(), 0.3, 0.1), expected)
    # density + gamma > 1: fewer outliers are cut so that density is kept
    assert torch.equal(outlier_trim_(delta.clone(), 0.95, 0.2), torch.where(delta == 5.0, 0.0, delta))
    assert torch.equal(outlier_trim_(delta.clone(), 0.3, 0.0), magnitude_trim_(delta.clone(), 0.3))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_match_spec(tensors, method):
    base, experts = tensors
    weights = [1.0, 0.5, 2.0]
    merged = fold(method, {"density": 0.4, "gamma": 0.05, "lambda": 0.7}, base, experts, weights)
    expected = getattr(reference, method)(base, experts, weights, 0.4, 0.05, 0.7)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_matches_spec(tensors, method):
    base, experts = tensors
    weights = [1.0, 0.5, 2.0]
    merged = fold(method, {"density": 0.4, "epsilon": 0.2, "lambda": 0.9}, base, experts, weights, seed=2)
    expected = getattr(reference, method)(base, experts, weights, 0.4, 0.2, 2, NAME, 0.9)
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


def test_magprune_keeps_large_entries_more_often_and_the_expected_value():
    magnitudes = torch.arange(1, 101, dtype=torch.float32).repeat(20_000, 1)  # 20 000 rows ranked 1..100
    pruned = della_drop_(magnitudes.clone(), 0.5, 0.3, 0, "w", 0)
    kept = (pruned != 0).float().mean(0)
    assert abs(float(kept[0]) - 0.2) < 0.03 and abs(float(kept[-1]) - 0.8) < 0.03  # density ∓ epsilon
    assert abs(float(kept.mean()) - 0.5) < 0.01
    torch.testing.assert_close(pruned.mean(0), magnitudes[0], rtol=0.05, atol=0)  # kept ones ÷ p; 3.5 σ
    vector = della_drop_(torch.ones(7), 0.5, 0.1, 0, "b", 0)  # a vector is one row; ties ranked in index order
    for j, value in enumerate(vector.tolist()):
        assert value == 0 or abs(value - 1 / (0.4 + 0.2 * j / 6)) < 1e-5


def test_model_stock_by_hand():
    base = torch.zeros(2, 2)
    first, second = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    # orthogonal task vectors: cosine 0, t = 0, the base
    assert torch.equal(fold("model_stock", {}, base, [first, second], [1.0, 1.0]), base)
    # identical ones: cosine 1, t = 1, their mean
    assert torch.equal(fold("model_stock", {}, base, [first, first], [1.0, 1.0]), first)
    # per row: row 0 is orthogonal, row 1 identical
    a, b = torch.tensor([[1.0, 0.0], [2.0, 2.0]]), torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    merged = fold("model_stock", {"filter_wise": True}, base, [a, b], [1.0, 1.0])
    assert torch.allclose(merged, torch.tensor([[0.0, 0.0], [1.5, 1.5]]))


def test_model_stock_matches_the_mean_pairwise_cosine(tensors):
    base, experts = tensors
    for filter_wise in (False, True):
        merged = fold("model_stock", {"filter_wise": filter_wise}, base, experts, [1.0] * 3)
        torch.testing.assert_close(merged, reference.model_stock(base, experts, filter_wise), rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_matches_mergekits_formula(t):
    g = torch.Generator().manual_seed(1)
    base, expert = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)  # far apart: a real angle
    merged = fold("slerp", {"t": t}, base, [expert], [1.0])
    torch.testing.assert_close(merged, reference.slerp(base, expert, t), rtol=0, atol=1e-5)
    near = base + 1e-3 * expert  # colinear: linear interpolation
    torch.testing.assert_close(fold("slerp", {"t": t}, base, [near], [1.0]), base + t * (near - base),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize(("method", "params", "field"), [
    ("della", {"density": 0.3, "epsilon": 0.3}, "params.epsilon: density ± epsilon must lie in (0, 1]"),
    ("della", {"epsilon": 0.1}, "params.density"),
    ("breadcrumbs", {"density": 0.5, "gamma": 1.0}, "params.gamma"),
    ("slerp", {}, "params.t"), ("slerp", {"t": 1.5}, "params.t"),
    ("model_stock", {"filter_wise": "rows"}, "params.filter_wise"),
])
def test_new_methods_name_the_bad_field(method, params, field):
    with pytest.raises(ConfigError, match=f"merge.yaml: {re.escape(field)}"):
        build_method(method, params, source="merge.yaml")
