"""Every bad input gets one line naming the file, tensor or field and the remedy, exit status 2, and no
output folder (or partial folder) left behind."""

import json
import logging
from pathlib import Path

import pytest
import torch

from merging.io.checkpoint import CheckpointReader, CheckpointWriter


def rewrite(source: Path, dest: Path, change) -> Path:
    """Copy a checkpoint through `change(tensors) -> tensors`, as one safetensors file."""
    reader = CheckpointReader(source)
    tensors = change({name: reader.read(name) for name in reader.names()})
    with CheckpointWriter(dest, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]) as out:
        for name, tensor in tensors.items():
            out.write(name, tensor)
        out.write_json("config.json", reader.config)
    return dest


def first_shard(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


@pytest.fixture()
def refuse(zoo, tmp_path, write_config, run_cli):
    """Merge with the given config fields; assert exit 2, one line matching `message`, nothing written."""
    def check(message: str, **fields) -> str:
        fields = {"base": zoo["base"], "experts": zoo["experts"][:2], "method": "ties",
                  "params": {"density": 0.5}} | fields
        out = tmp_path / "out"
        status, stdout, stderr = run_cli("merge", write_config(**fields), out)
        assert status == 2, stderr
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in stderr, stderr
        assert message in lines[0], lines[0]
        assert not out.exists() and not list(tmp_path.glob(".out.*")), "output left behind"
        return lines[0]
    return check


def test_missing_folder(refuse, tmp_path):
    refuse(f"{tmp_path / 'nowhere'}: no such checkpoint folder", base=tmp_path / "nowhere")


def test_missing_config_json(refuse, zoo, copy_model):
    expert = copy_model(zoo["experts"][0], "e")
    (expert / "config.json").unlink()
    refuse(f"{expert}: no config.json", experts=[expert])


def test_pickle_only_checkpoint_is_refused(refuse, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not unpickled")
    line = refuse("only pickle weights (pytorch_model.bin); mergeplan never unpickles", experts=[folder])
    assert "safe_serialization=True" in line


def test_corrupt_safetensors_header(refuse, zoo, copy_model):
    expert = copy_model(zoo["experts"][0], "e")
    shard = first_shard(expert)
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    refuse(f"{shard}: not a valid safetensors file (header is not JSON", experts=[expert])


def test_truncated_safetensors(refuse, zoo, copy_model):
    expert = copy_model(zoo["experts"][0], "e")
    shard = first_shard(expert)
    shard.write_bytes(shard.read_bytes()[:-100])
    refuse(f"{shard}: not a valid safetensors file (truncated: tensor", experts=[expert])


def test_index_names_a_missing_shard(refuse, zoo, copy_model):
    expert = copy_model(zoo["experts"][0], "e")
    shard = first_shard(expert)
    shard.unlink()
    refuse(f"names shard {shard.name} which is missing", experts=[expert])


def test_expert_with_another_architecture(refuse, zoo, copy_model):
    expert = copy_model(zoo["experts"][0], "e")
    config = json.loads((expert / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (expert / "config.json").write_text(json.dumps(config))
    refuse(f"{expert}/config.json: num_hidden_layers is 3, the base {zoo['base']} has 2", experts=[expert])


def test_expert_with_another_vocabulary_size(refuse, zoo, copy_model):
    expert = copy_model(zoo["experts"][0], "e")
    config = json.loads((expert / "config.json").read_text())
    config["vocab_size"] = 80
    (expert / "config.json").write_text(json.dumps(config))
    refuse("vocab_size is 80", experts=[expert])


def test_expert_missing_a_tensor(refuse, zoo, tmp_path):
    expert = rewrite(zoo["experts"][0], tmp_path / "e",
                     lambda t: {n: v for n, v in t.items() if n != "model.norm.weight"})
    refuse(f"{expert}: lacks tensor model.norm.weight that the base has", experts=[expert])


def test_expert_with_an_extra_tensor(refuse, zoo, tmp_path):
    expert = rewrite(zoo["experts"][0], tmp_path / "e", lambda t: t | {"model.extra.bias": torch.zeros(3)})
    refuse(f"{expert}: has tensor model.extra.bias that the base lacks", experts=[expert])


def test_tensor_shape_mismatch_names_the_tensor(refuse, zoo, tmp_path):
    def resize(tensors):
        tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:60]
        return tensors
    expert = rewrite(zoo["experts"][0], tmp_path / "e", resize)
    line = refuse(f"{expert}: tensor model.embed_tokens.weight has shape [60, 32], the base has [64, 32]",
                  experts=[expert])
    assert "vocabulary resized" in line


def test_nan_in_an_expert_is_refused_mid_stream(refuse, zoo, tmp_path):
    def poison(tensors):
        tensors["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")
        return tensors
    expert = rewrite(zoo["experts"][0], tmp_path / "e", poison)
    refuse(f"{expert}: tensor model.layers.1.mlp.down_proj.weight contains NaN or Inf", experts=[expert])


def test_inf_in_an_expert_is_refused(refuse, zoo, tmp_path):
    def poison(tensors):
        tensors["lm_head.weight"][0, 0] = float("inf")
        return tensors
    expert = rewrite(zoo["experts"][0], tmp_path / "e", poison)
    refuse("tensor lm_head.weight contains NaN or Inf", experts=[zoo["experts"][1], expert])


def test_dtype_mismatch_is_upcast_with_a_warning(zoo, tmp_path, write_config, run_cli, caplog):
    expert = rewrite(zoo["experts"][0], tmp_path / "e", lambda t: {n: v.float() for n, v in t.items()})
    config = write_config(base=zoo["base"], experts=[expert], method="average", dtype="float32")
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        assert run_cli("merge", config, tmp_path / "out")[0] == 0
    assert "tensors differ in dtype from the base" in caplog.text and str(expert) in caplog.text
    merged, source = CheckpointReader(tmp_path / "out"), CheckpointReader(expert)
    # average of one expert: the expert itself, read in float32 (no rounding to the base's bf16)
    assert all(torch.equal(merged.read(n), source.read(n)) for n in merged.names())


def test_empty_expert_list(refuse):
    refuse("experts: is empty; list at least one expert checkpoint folder", experts=[])


def test_same_expert_twice_warns(zoo, tmp_path, write_config, run_cli, caplog):
    config = write_config(base=zoo["base"], experts=[zoo["experts"][0], zoo["experts"][0]], method="average")
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        assert run_cli("merge", config, tmp_path / "out")[0] == 0
    assert f"expert {zoo['experts'][0]} is listed more than once" in caplog.text


def test_unknown_method(refuse):
    refuse("method: unknown method 'frankenmerge'; choose one of average, task_arithmetic, ties", method="frankenmerge")


@pytest.mark.parametrize("density", [0, 1.5, -0.2])
def test_density_outside_unit_interval(refuse, density):
    refuse("params.density: Input should be", params={"density": density})


def test_negative_weight_refused_outside_task_arithmetic(refuse, zoo):
    refuse("experts.1.weight: -0.5 is negative; ties takes weights of 0 or more",
           experts=[str(zoo["experts"][0]), {"path": str(zoo["experts"][1]), "weight": -0.5}])


def test_negative_weight_allowed_for_task_arithmetic(zoo, tmp_path, write_config, run_cli):
    config = write_config(base=zoo["base"], method="task_arithmetic", dtype="float32",
                          experts=[str(zoo["experts"][0]), {"path": str(zoo["experts"][1]), "weight": -1}])
    assert run_cli("merge", config, tmp_path / "out")[0] == 0
    merged, base = CheckpointReader(tmp_path / "out"), CheckpointReader(zoo["base"])
    first, second = CheckpointReader(zoo["experts"][0]), CheckpointReader(zoo["experts"][1])
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = base.read(name).float() + first.read(name).float() - second.read(name).float()
    torch.testing.assert_close(merged.read(name), expected, rtol=0, atol=1e-6)


def test_unknown_config_field_and_bad_yaml(refuse, tmp_path, run_cli):
    refuse("merge.yaml: density: is not a known field", density=0.5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed")
    status, _, err = run_cli("merge", bad, tmp_path / "out")
    assert status == 2 and err.startswith(f"error: {bad}: not valid YAML")


def test_existing_output_needs_overwrite(zoo, tmp_path, write_config, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config = write_config(base=zoo["base"], experts=zoo["experts"][:2], method="average")
    status, _, err = run_cli("merge", config, out)
    assert status == 2 and f"{out}: output folder exists; pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("merge", config, out, "--overwrite")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_a_failed_overwrite_keeps_the_old_output(zoo, tmp_path, write_config, run_cli):
    out = tmp_path / "out"
    good = write_config(base=zoo["base"], experts=zoo["experts"][:2], method="average")
    assert run_cli("merge", good, out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = rewrite(zoo["experts"][0], tmp_path / "bad",
                  lambda t: t | {"model.norm.weight": torch.full_like(t["model.norm.weight"], float("nan"))})
    config = write_config(base=zoo["base"], experts=[bad], method="average")
    assert run_cli("merge", config, out, "--overwrite")[0] == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_add_expert_with_a_non_finite_weight(zoo, tmp_path, write_config, run_cli):
    config = write_config(base=zoo["base"], experts=zoo["experts"][:2], method="task_arithmetic")
    assert run_cli("merge", config, tmp_path / "two", "--save-state", tmp_path / "state")[0] == 0
    status, _, err = run_cli("add-expert", tmp_path / "state", zoo["experts"][2], "-o", tmp_path / "three",
                             "--weight", "nan")
    assert status == 2 and err.strip() == "error: arguments: weight: must be a finite number"
    assert not (tmp_path / "three").exists()
