"""nuslerp, multislerp, karcher, nearswap and arcee_fusion: hand-worked cases, edge cases, and mergekit's outputs.

fixtures/mergekit_group_a.safetensors holds random 5×3 inputs (in.*), the cases (name, method, params, experts,
weights, with_base, vector) as JSON in its metadata, and mergekit 0.1.5's outputs: `out` (one per case) and
`out_vector` (row 4 of every input, for the cases whose vectors are rows). It was written by a throwaway script run
as `.venv-bench/bin/python /tmp/eq_a.py tests/merging/methods/fixtures/mergekit_group_a.safetensors /tmp/big`,
which called each mergekit kernel on a TensorGroup of the inputs (the base appended last, as mergekit-yaml does).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file

from merging.errors import ConfigError
from merging.methods.arcee_fusion import ArceeFusion
from merging.methods.karcher import Karcher
from merging.methods.multislerp import Multislerp
from merging.methods.nearswap import Nearswap
from merging.methods.nuslerp import Nuslerp

FIXTURE = Path(__file__).parent / "fixtures" / "mergekit_group_a.safetensors"
CLASSES = {method.name: method for method in (Nuslerp, Multislerp, Karcher, Nearswap, ArceeFusion)}
NAME = "model.layers.0.mlp.up_proj.weight"
R2 = math.sqrt(2) / 2


def merge(cls, params, base, experts, weights=None, seed=0):
    method = cls(cls.Params.model_validate(params), seed)
    return method.merge(base, experts, weights or [1.0] * len(experts), NAME)


def vec(*values):
    return torch.tensor(values, dtype=torch.float32)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


NAN = torch.full((2,), float("nan"))  # a base that must not be read


def test_class_contracts():
    contracts = {cls.name: (cls.takes_weights, cls.min_experts, cls.max_experts) for cls in CLASSES.values()}
    assert contracts == {"nuslerp": (True, 2, 2), "multislerp": (True, 1, None), "karcher": (False, 1, None),
                         "nearswap": (False, 1, 1), "arcee_fusion": (False, 1, 1)}
    with pytest.raises(ValidationError):
        Nearswap.Params.model_validate({})  # t has no default, as in mergekit
    with pytest.raises(ValidationError):
        Karcher.Params.model_validate({"weight": 1})


def test_nuslerp_orthogonal_experts_without_base():
    a, b = vec(1, 0), vec(0, 1)
    close(merge(Nuslerp, {"with_base": False}, NAN, [a, b], [1, 1]), [R2, R2])
    # t = w2 / (w1 + w2) = 3/4: (sin(π/8), sin(3π/8))
    close(merge(Nuslerp, {"with_base": False}, NAN, [a, b], [1, 3]), [math.sin(math.pi / 8), math.sin(3 * math.pi / 8)])
    # weights summing to 0 take t = ½
    close(merge(Nuslerp, {"with_base": False}, NAN, [a, b], [2, -2]), [R2, R2])


def test_nuslerp_interpolates_task_vectors_from_the_base():
    base = vec(1, 1)
    # the raw task vectors (2, 0) and (0, 2) are interpolated, not their directions
    close(merge(Nuslerp, {}, base, [base + vec(2, 0), base + vec(0, 2)], [1, 1]), [1 + 2 * R2, 1 + 2 * R2])


def test_nuslerp_colinear_is_lerp_and_zero_vector_is_spherical():
    close(merge(Nuslerp, {"with_base": False}, NAN, [vec(1, 2), vec(2, 4)], [3, 1]), [1.25, 2.5])
    # a zero vector has cos Ω = 0, so Ω = π/2 and the result is sin(π/4)·b, not b/2
    close(merge(Nuslerp, {"with_base": False}, NAN, [vec(0, 0), vec(0, 3)], [1, 1]), [0, 3 * R2])
    same = vec(0.3, -1.2)
    close(merge(Nuslerp, {"with_base": False}, NAN, [same, same], [1, 2]), same)
    close(merge(Nuslerp, {}, vec(1, 1), [vec(1, 1), vec(1, 1)], [1, 2]), [1, 1])


def test_nuslerp_vector_choice():
    a, b = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])

    def run(**options):
        return merge(Nuslerp, {"with_base": False, **options}, torch.zeros(2, 2), [a, b], [1, 1])

    # flattened: cos Ω = ½, Ω = π/3, sin(π/6) / sin(π/3) = 1/√3
    close(run(), (a + b) / math.sqrt(3))
    # rows: the first is orthogonal, the second identical
    close(run(nuslerp_flatten=False), [[R2, R2], [1, 0]])
    # row_wise takes the slices along dim 0: column 0 is (1,1)→(0,1) at Ω = π/4, column 1 is (0,0)→(1,0)
    k = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    close(run(nuslerp_flatten=False, nuslerp_row_wise=True), [[k, R2], [2 * k, 0]])


def test_multislerp_orthogonal_and_eps():
    a, b = vec(1, 0), vec(0, 1)
    close(merge(Multislerp, {"with_base": False}, NAN, [a, b], [1, 1]), [R2, R2])
    # unnormalised weights scale the mean norm Σ wi‖xi‖
    close(merge(Multislerp, {"with_base": False, "normalize_weights": False}, NAN, [a, b], [1, 1]), [2 * R2, 2 * R2])
    # the tangent sum vanishes, so L = ε and the result shrinks by cos ε
    close(merge(Multislerp, {"with_base": False, "eps": 0.01}, NAN, [a, b], [1, 1]), [R2 * math.cos(0.01)] * 2)
    base = vec(1, 1)
    close(merge(Multislerp, {}, base, [base + 3 * a, base + 3 * b], [2, 2]), [1 + 3 * R2, 1 + 3 * R2])


def test_multislerp_edge_cases():
    base, x = vec(1, -1), vec(0.5, 2.0)
    # one expert is returned as it is, even with a base
    close(merge(Multislerp, {}, base, [x], [0.3]), x)
    close(merge(Multislerp, {}, base, [x, x], [1, 2]), x)
    # a zero task vector has no direction but counts with its weight in the mean norm
    close(merge(Multislerp, {}, base, [base, base + vec(0, 2)], [1, 1]), base + vec(0, 1))
    # two antipodal task vectors with equal weights fall back to the lerp: the base
    close(merge(Multislerp, {}, base, [base + x, base - x], [1, 1]), base)
    with pytest.raises(ConfigError, match=NAME):
        merge(Multislerp, {"with_base": False}, NAN, [x, -x, vec(2, -0.5), vec(-2, 0.5)])


def test_karcher_orthogonal_and_base_as_an_input():
    close(merge(Karcher, {"with_base": False}, NAN, [vec(1, 0), vec(0, 1)]), [R2, R2])
    # with the base, the base is one more equally weighted input: the same mean
    close(merge(Karcher, {}, vec(1, 0), [vec(0, 1)]), [R2, R2])
    # symmetric directions; the scale is the mean norm (1 + 2 + 3) / 3
    three = merge(Karcher, {}, torch.tensor([1.0, 0, 0]), [torch.tensor([0, 2.0, 0]), torch.tensor([0, 0, 3.0])])
    close(three, [2 / math.sqrt(3)] * 3)


def test_karcher_iterates_to_the_geodesic_mean():
    x, y = vec(1, 0), vec(0, 1)
    # on a circle the mean angle of 0, 0, π/2 is π/6; the Euclidean start is atan(½)
    close(merge(Karcher, {"with_base": False}, NAN, [x, x, y]), [math.cos(math.pi / 6), math.sin(math.pi / 6)])
    close(merge(Karcher, {"with_base": False, "max_iter": 0}, NAN, [x, x, y]), vec(2, 1) / math.sqrt(5))


def test_karcher_edge_cases():
    zero = vec(0, 0)
    # a zero input has no direction but counts in the scale: (2·(1,0) + 0) / 2
    close(merge(Karcher, {"with_base": False}, NAN, [vec(2, 0), zero]), [1, 0])
    close(merge(Karcher, {"with_base": False}, NAN, [zero, zero]), zero)
    x = vec(0.25, -3.0)
    close(merge(Karcher, {"with_base": False}, NAN, [x]), x)
    close(merge(Karcher, {}, x, [x, x]), x)


def test_nearswap():
    base, expert = vec(0, 0, 0, 0), vec(0.05, 0.5, -2, 0)
    # w = clamp(t / |θ0 − θ1|, 0, 1): near entries swap, far ones move t towards the expert
    close(merge(Nearswap, {"t": 0.1}, base, [expert]), [0.05, 0.1, -0.1, 0])
    close(merge(Nearswap, {"t": 0.0}, base, [expert]), base)
    close(merge(Nearswap, {"t": -1.0}, base, [expert]), base)
    close(merge(Nearswap, {"t": 100.0}, base, [expert]), expert)
    close(merge(Nearswap, {"t": 0.1}, expert, [expert]), expert)


def test_arcee_fusion_keeps_the_outlying_changes():
    base = vec(0, 1, 0, -1, 0.5, 0, 2, 0)
    change = vec(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 5.0)
    # importance is |change| · KL (one row): quartiles at sorted indices 1, 3, 5, threshold (0.4 + 1.5·0.4)·KL
    close(merge(ArceeFusion, {}, base, [base + change]), base + change * (change > 1))
    # no change: zero importance, everything at the threshold, and the base back
    close(merge(ArceeFusion, {}, base, [base.clone()]), base)


def test_arcee_fusion_samples_large_tensors_from_the_seed():
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(1001, 1000, generator=generator)
    expert = base + 0.01 * torch.randn(1001, 1000, generator=generator)
    first = merge(ArceeFusion, {}, base, [expert], seed=5)
    assert torch.equal(first, merge(ArceeFusion, {}, base, [expert], seed=5))


def read_fixture():
    with safe_open(FIXTURE, "pt") as file:
        cases = json.loads(file.metadata()["cases"])
    return cases, load_file(FIXTURE)


CASES, TENSORS = read_fixture()
VECTOR_INDEX = {case[0]: i for i, case in enumerate(case for case in CASES if case[6])}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[case[0] for case in CASES])
def test_equals_mergekit(index):
    name, method, params, experts, weights, with_base, vector = CASES[index]
    cls = CLASSES[method]
    if "with_base" in cls.Params.model_fields:
        params = {**params, "with_base": with_base}
    inputs = {key[3:]: value for key, value in TENSORS.items() if key.startswith("in.")}
    out = merge(cls, params, inputs["base"], [inputs[e] for e in experts], weights)
    close(out, TENSORS["out"][index])
    if vector:
        rows = {key: value[4].clone() for key, value in inputs.items()}
        out = merge(cls, params, rows["base"], [rows[e] for e in experts], weights)
        close(out, TENSORS["out_vector"][VECTOR_INDEX[name]])
