"""passthrough over slices (a frankenmerge): layers of several models stacked in order, each tensor copied (times
its scale), the output config's layer count written; and its refusals."""

from __future__ import annotations

import json

import torch
import yaml
from test_mergekit_config import read_all, write_mergekit


def test_slices_of_two_models_are_stacked_renamed_and_scaled(zoo, tmp_path, run_cli):
    config = write_mergekit(tmp_path, zoo, "passthrough", None, dtype="float32", slices=[
        {"sources": [{"model": "expert0", "layer_range": [0, 2]}]},
        {"sources": [{"model": "expert1", "layer_range": [1, 2],
                      "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}}]}])
    status, _, err = run_cli("merge", config, tmp_path / "out")
    assert status == 0, err
    out, first, second = read_all(tmp_path / "out"), read_all(zoo["experts"][0]), read_all(zoo["experts"][1])
    assert torch.equal(out["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    for name in ("model.norm.weight", "lm_head.weight"):  # after the layers: the last slice's model
        assert torch.equal(out[name], second[name])
    for layer in (0, 1):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{layer}.{suffix}"], first[f"model.layers.{layer}.{suffix}"])
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], second["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.2.self_attn.o_proj.weight"],
                       torch.zeros_like(second["model.layers.1.self_attn.o_proj.weight"]))
    assert len(out) == len(first) + len([n for n in first if n.startswith("model.layers.1.")])
    model_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert model_config["num_hidden_layers"] == 3
    recipe = yaml.safe_load((tmp_path / "out" / "merge_config.yaml").read_text())
    assert recipe["method"] == "passthrough" and [r["layers"] for r in recipe["stack"]] == [[0, 2], [1, 2]]


def test_one_model_under_models_is_copied_in_the_output_dtype(zoo, tmp_path, run_cli):
    config = write_mergekit(tmp_path, zoo, "passthrough", [{"model": "expert2"}], dtype="bfloat16")
    assert run_cli("merge", config, tmp_path / "out")[0] == 0
    out, source = read_all(tmp_path / "out"), read_all(zoo["experts"][2])
    assert out.keys() == source.keys()
    assert all(torch.equal(out[n], source[n].to(torch.bfloat16).float()) for n in out)


def refused(zoo, tmp_path, run_cli, slices, message):
    config = write_mergekit(tmp_path, zoo, "passthrough", None, slices=slices)
    status, _, err = run_cli("merge", config, tmp_path / "out")
    assert status == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_two_sources_in_a_passthrough_slice_are_refused(zoo, tmp_path, run_cli):
    refused(zoo, tmp_path, run_cli, [{"sources": [{"model": "expert0", "layer_range": [0, 1]},
                                                  {"model": "expert1", "layer_range": [0, 1]}]}],
            "slices[0].sources: passthrough copies one source per slice; got 2")


def test_a_layer_range_beyond_the_model_is_refused(zoo, tmp_path, run_cli):
    refused(zoo, tmp_path, run_cli, [{"sources": [{"model": "expert0", "layer_range": [1, 4]}]}],
            "slices[0].sources[0].layer_range: [1, 4] is out of bounds")
