"""A checkpoint with a PEFT adapter applied (mergekit's MODEL+LORA) as one expert: its task vector and weights equal
what peft's merge_and_unload() of the adapter on that checkpoint gives, a merge with it equals task arithmetic done
by hand, and the wrong folders are refused by name."""

import json

import pytest
import torch
from peft_files import peft_adapter
from safetensors.torch import load_file, save_file

from merging import ExpertRef, MergeConfig, merge
from merging.errors import CheckpointError
from merging.experts import FullCheckpoint, open_expert
from merging.io.checkpoint import CheckpointReader
from merging.io.synthetic import llama_config, write_random_base, write_random_expert, write_random_lora
from merging.lora_on_model import LoraOnModel

peft = pytest.importorskip("peft")

CONFIG = llama_config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, dtype="float32")
Q_PROJ, UP_PROJ = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
LM_HEAD = "lm_head.weight"


def read_all(folder):
    reader = CheckpointReader(folder)
    return {name: reader.read(name) for name in reader.names()}


def peft_applied(model_folder, adapter_folder) -> dict[str, torch.Tensor]:
    """What mergekit does with MODEL+LORA: peft loads the adapter onto MODEL and merge_and_unload()s it."""
    from peft import PeftModel

    from merging.io.hf_loading import load_causal_lm

    merged = PeftModel.from_pretrained(load_causal_lm(model_folder), adapter_folder).merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """θ0, a full fine-tune M, a second expert E, and an adapter L trained on θ0 (rsLoRA, a rank pattern, an
    embedding, and lm_head saved whole, then changed so that it is neither θ0's nor M's)."""
    root = tmp_path_factory.mktemp("lora_on_model")
    base = write_random_base(root / "base", CONFIG, seed=0)
    model = write_random_expert(base, root / "m", seed=1, scale=0.5)
    other = write_random_expert(base, root / "e", seed=2, scale=0.5)
    adapter, _ = peft_adapter(base, root / "l", seed=5, target_modules=["q_proj", "v_proj", "down_proj",
                                                                       "embed_tokens"],
                              modules_to_save=["lm_head"], use_rslora=True, rank_pattern={"v_proj": 2})
    weights = load_file(adapter / "adapter_model.safetensors")
    saved = [key for key in weights if "lm_head" in key]
    assert len(saved) == 1
    weights[saved[0]] += 0.01 * torch.randn(weights[saved[0]].shape, generator=torch.Generator().manual_seed(9))
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return {"root": root, "base": base, "m": model, "e": other, "l": adapter,
            "adapted": peft_applied(model, adapter), "saved_lm_head": weights[saved[0]]}


def test_task_vector_and_weights_are_peft_merge_of_the_adapter_on_the_model(zoo):
    expert = open_expert(zoo["m"], zoo["l"])
    assert isinstance(expert, LoraOnModel) and not isinstance(expert, FullCheckpoint)
    assert expert.describe() == "full checkpoint + LoRA r=2/4 on down_proj,embed_tokens,q_proj,v_proj"
    base_reader = CheckpointReader(zoo["base"])
    expert.check_compatible(base_reader)
    base, model, adapted = read_all(zoo["base"]), read_all(zoo["m"]), zoo["adapted"]
    assert set(adapted) == set(base)
    for name, theta0 in base.items():
        vector = expert.read_task_vector(name, theta0.float())
        torch.testing.assert_close(vector, adapted[name] - theta0, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(expert.weights(name, base_reader), adapted[name], rtol=0, atol=1e-6, msg=name)
    # the adapter's update really sits on top of M's own task vector; untouched tensors are M's; lm_head is the
    # adapter's saved copy, not M's
    q_update = expert.read_task_vector(Q_PROJ, base[Q_PROJ]) - (model[Q_PROJ] - base[Q_PROJ])
    assert q_update.abs().max() > 1e-3 and (model[Q_PROJ] - base[Q_PROJ]).abs().max() > 1e-3
    assert torch.equal(expert.read_task_vector(UP_PROJ, base[UP_PROJ]), model[UP_PROJ] - base[UP_PROJ])
    torch.testing.assert_close(expert.read_task_vector(LM_HEAD, base[LM_HEAD]), zoo["saved_lm_head"] - base[LM_HEAD],
                               rtol=0, atol=1e-7)
    assert (zoo["saved_lm_head"] - model[LM_HEAD]).abs().max() > 1e-3


def test_merge_with_model_plus_lora_equals_task_arithmetic_by_hand(zoo, tmp_path):
    config = MergeConfig(base=zoo["base"], method="task_arithmetic",
                         experts=[ExpertRef(path=zoo["m"], lora=zoo["l"], weight=0.6),
                                  ExpertRef(path=zoo["e"], weight=0.4)])
    merged = read_all(merge(config, tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no merged copy of M+L was written anywhere
    base, other = read_all(zoo["base"]), read_all(zoo["e"])
    assert list(merged) == list(base)
    for name, theta0 in base.items():
        expected = theta0 + 0.6 * (zoo["adapted"][name] - theta0) + 0.4 * (other[name] - theta0)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6, msg=name)
    assert (merged[Q_PROJ] - base[Q_PROJ]).abs().max() > 1e-3


def test_a_merge_yaml_expert_with_lora_runs_from_the_cli(zoo, tmp_path, run_cli, write_config):
    config = write_config(base=zoo["base"], method="average", experts=[{"path": str(zoo["m"]), "lora": str(zoo["l"])}])
    status, _, err = run_cli("merge", config, tmp_path / "out")
    assert status == 0, err
    for name, tensor in read_all(tmp_path / "out").items():
        torch.testing.assert_close(tensor, zoo["adapted"][name], rtol=0, atol=1e-6, msg=name)


def test_wrong_folders_for_model_plus_lora_are_named(zoo, tmp_path):
    with pytest.raises(CheckpointError) as error:
        open_expert(zoo["l"], zoo["l"])
    assert str(error.value) == (f"{zoo['l']}: is a LoRA adapter, so the LoRA {zoo['l']} cannot be applied to it; "
                                "MODEL+LORA needs a full checkpoint as MODEL")
    with pytest.raises(CheckpointError, match=f"^{zoo['e']}: no adapter_config.json, so not a PEFT LoRA adapter to "
                                              f"apply to {zoo['m']}$"):
        open_expert(zoo["m"], zoo["e"])
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'gone'}: no such LoRA adapter folder"):
        open_expert(zoo["m"], tmp_path / "gone")
    wider = write_random_base(tmp_path / "wider", CONFIG | {"hidden_size": 48, "head_dim": 12}, seed=3)
    alien = write_random_lora(wider, tmp_path / "alien", seed=4)
    with pytest.raises(CheckpointError, match=f"^{alien}/adapter_config.json: base_model_name_or_path {wider} has "
                                              "hidden_size 48, the base .* has 32; this adapter was trained on"):
        open_expert(zoo["m"], alien).check_compatible(CheckpointReader(zoo["base"]))
    config = json.loads((alien / "adapter_config.json").read_text()) | {"base_model_name_or_path": "org/wider"}
    (alien / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"^{alien}: LoRA factors of .* make a .* update, the base tensor is "):
        open_expert(zoo["m"], alien).check_compatible(CheckpointReader(zoo["base"]))
