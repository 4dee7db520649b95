"""Per-tensor parameters with mergekit's semantics: gradients interpolated at each layer's position, filters as
substrings of the tensor name, scopes from a slice's source up to the config, and one-line errors."""

from __future__ import annotations

import logging

import pytest
import torch

from merging.errors import ConfigError
from merging.parameters import LayerSlice, ParameterPlan, evaluate, layer_count, position

ATTENTION = "model.layers.{}.self_attn.q_proj.weight"
MLP = "model.layers.{}.mlp.up_proj.weight"
NAMES = [ATTENTION.format(i) for i in range(5)] + [MLP.format(i) for i in range(5)] + [
    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]


def test_a_gradient_is_interpolated_at_t_and_a_list_of_labels_is_picked():
    assert evaluate([0.0, 1.0], "x", 0.25) == 0.25
    assert evaluate([0, 0.5, 0.3, 0.7, 1], "x", 0.5) == pytest.approx(0.3)
    assert evaluate([0, 0.5, 0.3, 0.7, 1], "x", 0.6) == pytest.approx(0.3 + 0.4 * 0.4)  # between 0.3 and 0.7
    assert evaluate([1, 2, 3], "x", 1.0) == 3
    assert evaluate([True, False], "x", 0.9) is True  # not numbers: element int(t·(n − 1))


def test_the_first_matching_filter_wins_and_none_matching_leaves_it_unset():
    setting = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]
    assert evaluate(setting, ATTENTION.format(2), 0.5) == 0.5
    assert evaluate(setting, MLP.format(0), 0.0) == 0.7
    assert evaluate(setting, "model.norm.weight", 0.0) == 0.5
    assert evaluate([{"filter": "mlp", "value": 1}], "lm_head.weight", 0.0) is None


def test_positions_run_over_the_layers_of_each_slice():
    assert layer_count(NAMES) == 5
    assert position(ATTENTION.format(3), [(0, 5)]).t == pytest.approx(0.75)
    assert position(ATTENTION.format(3), [(0, 2), (2, 5)]) == (1, 0.5)
    assert position(ATTENTION.format(4), [(0, 4), (4, 5)]) == (1, 1.0)  # a one-layer slice is at t = 1
    assert position("model.embed_tokens.weight", [(0, 2), (2, 5)]) == (0, 0.0)  # before the layers: first slice
    assert position("lm_head.weight", [(0, 2), (2, 5)]) == (1, 0.0)  # after them: the last one, t = 0


def test_scopes_from_a_slice_source_to_the_config_then_the_weight_and_defaults():
    slices = [LayerSlice(layers=(0, 2), params={"density": 0.9}, experts=[{"weight": 5.0}, {}]),
              LayerSlice(layers=(2, 5))]
    plan = ParameterPlan({"density": 0.3, "lambda": [1.0, 0.0]}, [{"density": 0.6}, {}], [1.0, 2.0], slices, 5,
                         "merge.yaml")
    first = plan.resolve(ATTENTION.format(1), ["lambda", "normalize"], ["density"])
    assert first.shared == {"lambda": 0.0}  # t = 1 in the first slice; normalize unset: the method's default
    assert first.experts == [{"weight": 5.0, "density": 0.6}, {"weight": 2.0, "density": 0.9}]
    later = plan.resolve(ATTENTION.format(3), ["lambda"], ["density"])
    assert later.shared == {"lambda": 0.5} and later.experts == [{"weight": 1.0, "density": 0.6},
                                                                  {"weight": 2.0, "density": 0.3}]


@pytest.mark.parametrize(("params", "message"), [
    ({"t": [0.1] * 6}, "merge.yaml: params.t: a gradient of 6 values over 5 layers"),
    ({"t": [{"filter": "mlp", "value": 1, "then": 2}]}, "merge.yaml: params.t[0]: then: not a field of a conditional"),
    ({"t": {"a": 1}}, "merge.yaml: params.t: expected a value, a list of values"),
])
def test_bad_settings_are_one_line_naming_the_field(params, message):
    with pytest.raises(ConfigError) as error:
        ParameterPlan(params, [], [], [], 5, "merge.yaml")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_slices_must_cover_the_layers_once_in_order():
    with pytest.raises(ConfigError, match="slices.1.layers: starts at layer 3, not 2"):
        ParameterPlan({}, [], [], [LayerSlice(layers=(0, 2)), LayerSlice(layers=(3, 5))], 5, "m.yaml")
    with pytest.raises(ConfigError, match=r"slices.0.layers: \[0, 6\] is out of bounds: the base has 5 layers"):
        ParameterPlan({}, [], [], [LayerSlice(layers=(0, 6))], 5, "m.yaml")


def test_a_filter_that_matches_no_tensor_is_named_in_a_warning(caplog):
    plan = ParameterPlan({"t": [{"filter": "mlp", "value": 1}, {"filter": "cross_attn", "value": 0}]}, [], [], [],
                         5, "m.yaml")
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        plan.warn_unmatched_filters(NAMES)
    assert [r.getMessage() for r in caplog.records] == ["m.yaml: params.t: filter 'cross_attn' matches no tensor "
                                                        "name; it changes nothing"]


def test_an_incremental_merge_with_per_tensor_parameters_equals_the_batch_merge(zoo, tmp_path):
    from merging import ExpertRef, MergeConfig, add_experts, merge
    from merging.io.checkpoint import CheckpointReader

    settings = {"density": [{"filter": "mlp", "value": [0.3, 0.8]}, {"value": 0.5}],
                "normalize": [{"filter": "self_attn", "value": False}, {"value": True}]}
    first = [ExpertRef(path=zoo["experts"][0], params={"weight": [1.0, 2.0]}),
             ExpertRef(path=zoo["experts"][1], params={"density": 0.9})]
    third = ExpertRef(path=zoo["experts"][2], weight=0.5)
    config = MergeConfig(base=zoo["base"], experts=first, method="ties", params=settings, dtype="float32")
    merge(config, tmp_path / "two", save_state=tmp_path / "state")
    add_experts(tmp_path / "state", [third], tmp_path / "three")
    merge(config.model_copy(update={"experts": [*first, third]}), tmp_path / "batch")
    incremental, batch = CheckpointReader(tmp_path / "three"), CheckpointReader(tmp_path / "batch")
    assert all(torch.equal(incremental.read(n), batch.read(n)) for n in batch.names())
    two = CheckpointReader(tmp_path / "two")
    assert any(not torch.equal(two.read(n), batch.read(n)) for n in batch.names())
