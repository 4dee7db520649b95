"""mergekit YAML files given to `mergeplan merge`: the shared methods give mergekit's maths (checked against the
spec's reference on the merged tensors), differences are one notice each, the rest is refused by name."""

from __future__ import annotations

import pytest
import reference
import torch
import yaml

from merging.io.checkpoint import CheckpointReader


def read_all(folder):
    reader = CheckpointReader(folder)
    return {name: reader.read(name).float() for name in reader.names()}


def write_mergekit(tmp_path, zoo, merge_method: str, models: list[dict], **top) -> str:
    """A mergekit config in TMP_PATH whose models are named by relative paths, as mergekit users write them."""
    names = {zoo["base"]: "base", **{e: f"expert{i}" for i, e in enumerate(zoo["experts"])}}
    for path, name in names.items():
        (tmp_path / name).symlink_to(path)
    data = {"merge_method": merge_method, "models": models, **top}
    path = tmp_path / "mergekit.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def merged(run_cli, config, out):
    status, _, err = run_cli("merge", config, out)
    assert status == 0, err
    return read_all(out), err


def test_linear_is_the_weighted_mean_of_every_listed_model_base_included(zoo, tmp_path, run_cli, caplog):
    config = write_mergekit(tmp_path, zoo, "linear", base_model="base", dtype="float32", models=[
        {"model": "base", "parameters": {"weight": 1.0}},
        {"model": "expert0", "parameters": {"weight": 2.0}},
        {"model": "expert1", "parameters": {"weight": 1.0}}])
    tensors, _ = merged(run_cli, config, tmp_path / "out")
    base, e0, e1 = (read_all(p) for p in (zoo["base"], *zoo["experts"][:2]))
    for name, tensor in tensors.items():
        expected = (base[name] + 2 * e0[name] + e1[name]) / 4
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # exact: no notice


def test_task_arithmetic_takes_weights_lambda_and_normalize_and_skips_the_listed_base(zoo, tmp_path, run_cli):
    config = write_mergekit(tmp_path, zoo, "task_arithmetic", base_model="base", out_dtype="float32",
                            parameters={"lambda": 0.7, "normalize": True}, models=[
                                {"model": "base"}, {"model": "expert0", "parameters": {"weight": 0.5}},
                                {"model": "expert2", "parameters": {"weight": 1.5}}])
    tensors, _ = merged(run_cli, config, tmp_path / "out")
    base, e0, e2 = (read_all(p) for p in (zoo["base"], zoo["experts"][0], zoo["experts"][2]))
    for name, tensor in tensors.items():
        expected = reference.linear(base[name], [e0[name], e2[name]], [0.5, 1.5], 0.7, normalize=True)
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)


def test_ties_equals_the_native_config_with_one_density(zoo, tmp_path, run_cli):
    config = write_mergekit(tmp_path, zoo, "ties", base_model="base", parameters={"density": 0.3}, models=[
        {"model": f"expert{i}", "parameters": {"weight": 1.0 + i}} for i in range(3)])
    tensors, _ = merged(run_cli, config, tmp_path / "out")
    native = tmp_path / "native.yaml"
    native.write_text(yaml.safe_dump({"base": "base", "method": "ties", "params": {"density": 0.3},
                                      "experts": [{"path": f"expert{i}", "weight": 1.0 + i} for i in range(3)]}))
    expected, _ = merged(run_cli, native, tmp_path / "native")
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[n], expected[n]) for n in tensors)


def test_dare_ties_says_how_it_differs_from_mergekit(zoo, tmp_path, run_cli, caplog):
    config = write_mergekit(tmp_path, zoo, "dare_ties", base_model="base", dtype="bfloat16", models=[
        {"model": "expert0", "parameters": {"density": 0.5, "weight": 1.0}},
        {"model": "expert1", "parameters": {"density": 0.5, "weight": 1.0}}])
    tensors, _ = merged(run_cli, config, tmp_path / "out")
    notices = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(notices) == 2 and all(n.startswith(f"{config}: ") and "\n" not in n for n in notices), notices
    assert [any(part in n for n in notices) for part in ("random masks", "computes in float32")] == [True] * 2
    reader = CheckpointReader(tmp_path / "out")
    assert {reader.read(n).dtype for n in reader.names()} == {torch.bfloat16}
    assert any(not torch.equal(t, read_all(zoo["base"])[n]) for n, t in tensors.items())


REFUSED = [
    ("slerp of three", {"merge_method": "slerp", "parameters": {"t": 0.5},
                        "models": [{"model": "base"}, {"model": "expert0"}, {"model": "expert1"}]},
     "slerp takes at most 1 expert(s), got 2"),
    ("slerp without t", {"merge_method": "slerp", "parameters": {},
                         "models": [{"model": "base"}, {"model": "expert0"}]}, "params.t: is required"),
    ("unknown method", {"merge_method": "frankenmerge"}, "unknown mergekit method 'frankenmerge'"),
    ("gradient longer than the layers", {"parameters": {"density": [0.1, 0.2, 0.3, 0.4, 0.5]}},
     "params.density: a gradient of 5 values over 2 layers"),
    ("bad conditional", {"parameters": {"density": [{"filter": "mlp", "value": 0.5, "when": 1}]}},
     "params.density[0]: when: not a field of a conditional"),
    ("unknown global parameter", {"parameters": {"density": 0.5, "t": 0.1}}, "parameters.t: ties takes no such"),
    ("shared parameter given per model", {"models": [{"model": "expert0", "parameters": {"lambda": 0.1}}]},
     "experts.0.params.lambda: ties takes no such per-expert parameter"),
    ("unknown model parameter", {"models": [{"model": "expert0", "parameters": {"t": 0.1}}]},
     "models[0].parameters.t: ties takes no such parameter"),
    ("slices of other lengths", {"models": None, "slices": [
        {"sources": [{"model": "expert0", "layer_range": [0, 2]}, {"model": "expert1", "layer_range": [0, 1]}]}]},
     "slices: sources of different layer ranges are only stacked by passthrough"),
    ("slice out of bounds", {"models": None, "slices": [
        {"sources": [{"model": "expert0", "layer_range": [0, 3]}, {"model": "expert1", "layer_range": [0, 3]}]}]},
     "slices.0.layers: [0, 3] is out of bounds: the base has 2 layers"),
    ("slices with a gap", {"models": None, "slices": [
        {"sources": [{"model": "expert0", "layer_range": [1, 2]}, {"model": "expert1", "layer_range": [1, 2]}]}]},
     "slices.0.layers: starts at layer 1, not 0"),
    ("models and slices", {"slices": []}, "give exactly one of models: and slices:"),
    ("modules", {"modules": {"text": {}}}, "modules: per-module merges"),
    ("union tokenizer", {"tokenizer_source": "union"}, "tokenizer_source: 'union' needs mergekit's vocabulary"),
    ("chat template", {"chat_template": "chatml"}, "chat_template: not supported"),
    ("unknown field", {"merge_options": {}}, "merge_options: not a field of a mergekit config"),
    ("no base", {"base_model": None}, "base_model: required by ties"),
    ("linear unnormalised", {"merge_method": "linear", "base_model": None, "parameters": {"normalize": False}},
     "normalize: false with weights summing to 2"),
    ("bad dtype", {"dtype": "int4"}, "dtype: 'int4'"),
]


@pytest.mark.parametrize(("case", "change", "message"), REFUSED, ids=[case for case, _, _ in REFUSED])
def test_what_cannot_be_mapped_is_refused_by_name(zoo, tmp_path, run_cli, case, change, message):
    data = {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.5},
            "models": [{"model": "expert0"}, {"model": "expert1"}]}
    for key, value in change.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    config = write_mergekit(tmp_path, zoo, data.pop("merge_method"), data.pop("models", None), **data)
    status, out, err = run_cli("merge", config, tmp_path / "out")
    assert status == 2 and err.count("\n") == 1 and err.startswith(f"error: {config}: "), err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


NATIVE_TWINS = [
    ("breadcrumbs", {"density": 0.5, "gamma": 0.02, "lambda": 0.9}, {"density": 0.5, "gamma": 0.02, "lambda": 0.9,
                                                                     "normalize": False}, []),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.02, "normalize": True}, {"density": 0.5, "gamma": 0.02,
                                                                              "lambda": 1.0}, []),
    ("della_linear", {"density": 0.5, "epsilon": 0.1}, {"density": 0.5, "epsilon": 0.1, "lambda": 1.0,
                                                        "normalize": False}, ["keep probability"]),
    ("della", {"density": 0.6}, {"density": 0.6, "lambda": 1.0}, ["keep probability"]),
    ("model_stock", {"filter_wise": True}, {"filter_wise": True}, []),
]


@pytest.mark.parametrize(("method", "parameters", "native_params", "notices"), NATIVE_TWINS,
                         ids=[case[0] for case in NATIVE_TWINS])
def test_the_added_methods_equal_their_native_configs(zoo, tmp_path, run_cli, caplog, method, parameters,
                                                      native_params, notices):
    config = write_mergekit(tmp_path, zoo, method, base_model="base", parameters=parameters, models=[
        {"model": "base"}, *({"model": f"expert{i}"} for i in range(3))])
    tensors, _ = merged(run_cli, config, tmp_path / "out")
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [any(part in n for n in said) for part in notices] == [True] * len(notices) and len(said) == len(notices)
    native = tmp_path / "native.yaml"
    native.write_text(yaml.safe_dump({"base": "base", "method": method, "params": native_params,
                                      "experts": [f"expert{i}" for i in range(3)]}))
    expected, _ = merged(run_cli, native, tmp_path / "native")
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[n], expected[n]) for n in tensors)


def test_slerp_interpolates_from_the_base_model_to_the_other(zoo, tmp_path, run_cli):
    config = write_mergekit(tmp_path, zoo, "slerp", base_model="expert0", dtype="float32", parameters={"t": 0.25},
                            models=[{"model": "expert0"}, {"model": "expert1"}])
    tensors, _ = merged(run_cli, config, tmp_path / "out")
    first, second = read_all(zoo["experts"][0]), read_all(zoo["experts"][1])
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, reference.slerp(first[name], second[name], 0.25), rtol=0, atol=1e-5)
