"""PEFT LoRA adapters as experts: every method against merges of the merge_and_unload()-ed copies, mixed with
full checkpoints, incremental, calibrated, evaluated; and the adapters mergeplan refuses."""

import json
import logging
import shutil

import pytest
import torch
from peft_files import peft_adapter
from safetensors.torch import save_file

from merging import ExpertRef, MergeConfig, add_experts, merge
from merging.experts import LoraAdapter, load_expert_model, open_expert
from merging.io.checkpoint import CheckpointReader
from merging.io.synthetic import llama_config, write_random_base, write_random_lora

peft = pytest.importorskip("peft")

CONFIG = llama_config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, dtype="float32")
METHODS = {
    "average": {},
    "task_arithmetic": {"lambda": 0.7},
    "ties": {"density": 0.3},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.4},
}


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_zoo")
    base = write_random_base(root / "base", CONFIG, seed=0)
    pairs = [peft_adapter(base, root / f"e{i}", seed=i + 1, r=2 + 2 * i, use_rslora=i == 1) for i in range(3)]
    return {"base": base, "adapters": [a for a, _ in pairs], "dense": [d for _, d in pairs]}


def read_all(folder):
    reader = CheckpointReader(folder)
    return {name: reader.read(name) for name in reader.names()}


@pytest.mark.parametrize("method", list(METHODS))
def test_adapter_merge_equals_the_merge_of_merged_and_unloaded_copies(lora_zoo, tmp_path, method):
    def merged(experts, name):
        config = MergeConfig(base=lora_zoo["base"], experts=[ExpertRef(path=p) for p in experts], method=method,
                             params=METHODS[method], seed=3)
        return read_all(merge(config, tmp_path / name))

    from_adapters, from_dense = merged(lora_zoo["adapters"], "a"), merged(lora_zoo["dense"], "d")
    base = read_all(lora_zoo["base"])
    assert list(from_adapters) == list(from_dense)
    for name, tensor in from_adapters.items():
        torch.testing.assert_close(tensor, from_dense[name], rtol=0, atol=1e-6, msg=name)
    # the adapters really moved the targeted tensors, and only those
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert (from_adapters[q_proj] - base[q_proj]).abs().max() > 1e-3
    assert torch.equal(from_adapters["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_task_vector_is_scale_times_b_at_a_and_rslora_scales_by_sqrt_rank(lora_zoo):
    from safetensors.torch import load_file

    for adapter, rslora in ((lora_zoo["adapters"][0], False), (lora_zoo["adapters"][1], True)):
        expert = open_expert(adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        factors = load_file(adapter / "adapter_model.safetensors")
        prefix = "base_model.model.model.layers.1.mlp.down_proj"
        a, b = factors[f"{prefix}.lora_A.weight"], factors[f"{prefix}.lora_B.weight"]
        scale = config["lora_alpha"] / (a.shape[0] ** 0.5 if rslora else a.shape[0])
        base = CheckpointReader(lora_zoo["base"]).read("model.layers.1.mlp.down_proj.weight")
        vector = expert.read_task_vector("model.layers.1.mlp.down_proj.weight", base)
        torch.testing.assert_close(vector, scale * (b @ a), rtol=1e-6, atol=1e-7)
        assert expert.read_task_vector("model.layers.1.mlp.up_proj.weight", base) is None


def test_embeddings_modules_to_save_and_rank_pattern_apply_as_peft_merges_them(tmp_path):
    base = write_random_base(tmp_path / "base", CONFIG, seed=0)
    adapter, dense = peft_adapter(base, tmp_path / "e", seed=7, target_modules=["q_proj", "embed_tokens", "v_proj"],
                                  modules_to_save=["lm_head"], rank_pattern={"v_proj": 2},
                                  alpha_pattern={"q_proj": 3})
    names = {k.removeprefix("base_model.model.") for k in CheckpointReader(adapter, prefix="adapter_model",
                                                                           config_name="adapter_config.json").tensors}
    assert "lm_head.weight" in names and "model.embed_tokens.lora_embedding_A" in names
    single = merge(MergeConfig(base=base, experts=[ExpertRef(path=adapter)], method="average"), tmp_path / "out")
    expected = read_all(dense)
    for name, tensor in read_all(single).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)


def test_adapters_and_full_checkpoints_mix_and_mixed_ranks_are_logged(lora_zoo, tmp_path, caplog):
    experts = [lora_zoo["adapters"][0], lora_zoo["dense"][1], lora_zoo["adapters"][2]]
    same = [lora_zoo["dense"][0], lora_zoo["dense"][1], lora_zoo["dense"][2]]
    with caplog.at_level(logging.INFO, logger="mergeplan"):
        mixed = read_all(merge(MergeConfig(base=lora_zoo["base"], experts=[ExpertRef(path=p) for p in experts],
                                           method="ties", params={"density": 0.5}), tmp_path / "mixed"))
    assert "LoRA r=2" in caplog.text and "LoRA r=6" in caplog.text and "full checkpoint" in caplog.text
    dense = read_all(merge(MergeConfig(base=lora_zoo["base"], experts=[ExpertRef(path=p) for p in same],
                                       method="ties", params={"density": 0.5}), tmp_path / "dense"))
    for name, tensor in mixed.items():
        torch.testing.assert_close(tensor, dense[name], rtol=0, atol=1e-6, msg=name)


def test_incremental_merge_of_an_adapter_is_bit_identical_to_a_full_merge(lora_zoo, tmp_path):
    refs = [ExpertRef(path=p) for p in lora_zoo["adapters"]]
    config = MergeConfig(base=lora_zoo["base"], experts=refs[:2], method="ties", params={"density": 0.4})
    merge(config, tmp_path / "two", save_state=tmp_path / "state")
    add_experts(tmp_path / "state", [lora_zoo["adapters"][2]], tmp_path / "three")
    full = merge(config.model_copy(update={"experts": refs}), tmp_path / "full")
    incremental, batch = read_all(tmp_path / "three"), read_all(full)
    assert all(torch.equal(incremental[n], batch[n]) for n in batch)


def test_an_adapter_loads_as_the_model_peft_merges(lora_zoo):
    adapter, dense = lora_zoo["adapters"][1], lora_zoo["dense"][1]
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        ours = load_expert_model(adapter)(input_ids=ids).logits  # the base from base_model_name_or_path
        theirs = load_expert_model(dense)(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_adapters(tiny_zoo, tmp_path_factory):
    """LoRA adapters on the tiny zoo's trained base (it has a tokenizer and data), with their dense copies."""
    root = tmp_path_factory.mktemp("tiny_lora")
    domains = ["algebra", "code", "biology"]
    pairs = {d: peft_adapter(tiny_zoo / "base", root / d, seed=i, lora_alpha=16) for i, d in enumerate(domains)}
    for _, dense in pairs.values():
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_zoo / "base" / file, dense / file)
    return {d: {"adapter": adapter, "dense": dense} for d, (adapter, dense) in pairs.items()}


def test_expert_merging_on_adapters_learns_the_coefficients_of_their_dense_copies(tiny_zoo, tiny_adapters, tmp_path):
    from merging.calibration.coefficients import Coefficients

    def calibrate(kind):
        experts = [{"path": str(tiny_adapters[d][kind]), "name": d} for d in tiny_adapters]
        config = MergeConfig(base=tiny_zoo / "base", experts=experts, method="expert_merging_pp",
                             calibration={d: tiny_zoo / "data" / d / "calib.jsonl" for d in tiny_adapters},
                             params={"samples_per_expert": 2, "epochs": 2})
        return Coefficients.load(merge(config, tmp_path / f"em-{kind}") / "coefficients.json")

    ours, theirs = calibrate("adapter"), calibrate("dense")
    assert ours.alpha.keys() == theirs.alpha.keys()
    for name in ours.alpha:
        torch.testing.assert_close(ours.alpha[name], theirs.alpha[name], rtol=0, atol=1e-4, msg=name)
    moved = max((a - 0.3).abs().max().item() for a in ours.alpha.values())
    assert moved > 1e-3  # calibration did train


def test_evaluating_an_adapter_equals_evaluating_its_dense_copy(tiny_zoo, tiny_adapters, run_cli, tmp_path):
    adapter, dense = tiny_adapters["algebra"]["adapter"], tiny_adapters["algebra"]["dense"]
    outputs = {}
    for kind, folder, extra in (("adapter", adapter, ["--base", tiny_zoo / "base"]), ("dense", dense, []),
                                ("base", tiny_zoo / "base", [])):
        status, _, err = run_cli("evaluate", folder, "--data", tiny_zoo / "data", "--domains", "algebra",
                                 "--json", tmp_path / f"{kind}.json", *extra)
        assert status == 0, err
        outputs[kind] = json.loads((tmp_path / f"{kind}.json").read_text())
    assert outputs["adapter"]["macro_ce"] == pytest.approx(outputs["dense"]["macro_ce"], abs=1e-5)
    assert abs(outputs["adapter"]["macro_ce"] - outputs["base"]["macro_ce"]) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Adapters refused, one line each, nothing written


def broken_adapter(lora_zoo, tmp_path, config=None, tensors=None, drop_weights=False):
    folder = shutil.copytree(lora_zoo["adapters"][0], tmp_path / "broken")
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    if tensors is not None:
        save_file(tensors, folder / "adapter_model.safetensors")
    if drop_weights:
        (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    return folder


def refused(run_cli, write_config, lora_zoo, tmp_path, adapter):
    config = write_config(base=lora_zoo["base"], experts=[lora_zoo["adapters"][1], adapter], method="average")
    status, out, err = run_cli("merge", config, tmp_path / "out")
    assert status == 2
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def adapter_tensors(lora_zoo):
    from safetensors.torch import load_file

    return load_file(lora_zoo["adapters"][0] / "adapter_model.safetensors")


@pytest.mark.parametrize(("change", "message"), [
    ({"use_dora": True}, "use_dora is set: DoRA"),
    ({"peft_type": "IA3"}, "peft_type is 'IA3'"),
    ({"peft_type": "PROMPT_TUNING"}, "peft_type is 'PROMPT_TUNING'"),
    ({"r": 0}, "r is 0"),
])
def test_unsupported_adapter_configs_are_named(lora_zoo, tmp_path, run_cli, write_config, change, message):
    assert message in refused(run_cli, write_config, lora_zoo, tmp_path, broken_adapter(lora_zoo, tmp_path, change))


def test_pickle_only_adapter_is_refused(lora_zoo, tmp_path, run_cli, write_config):
    err = refused(run_cli, write_config, lora_zoo, tmp_path, broken_adapter(lora_zoo, tmp_path, drop_weights=True))
    assert "only pickle adapter weights (adapter_model.bin)" in err and "never unpickles" in err


def test_adapter_for_another_base_is_refused_by_shape_and_by_its_declared_base(lora_zoo, tmp_path, run_cli,
                                                                             write_config):
    tensors = adapter_tensors(lora_zoo)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0], 40)
    err = refused(run_cli, write_config, lora_zoo, tmp_path, broken_adapter(lora_zoo, tmp_path, tensors=tensors))
    assert "LoRA factors of model.layers.0.self_attn.q_proj.weight make a [32, 40] update" in err
    other = write_random_base(tmp_path / "other", CONFIG | {"num_hidden_layers": 3}, seed=1)
    shutil.rmtree(tmp_path / "broken")
    err = refused(run_cli, write_config, lora_zoo, tmp_path,
                  broken_adapter(lora_zoo, tmp_path, {"base_model_name_or_path": str(other)}))
    assert "num_hidden_layers 3" in err and "trained on another base" in err


def test_modules_to_save_the_base_lacks_is_refused(lora_zoo, tmp_path, run_cli, write_config):
    tensors = adapter_tensors(lora_zoo) | {"base_model.model.score.weight": torch.zeros(2, 32)}
    adapter = broken_adapter(lora_zoo, tmp_path, {"modules_to_save": ["score"]}, tensors)
    err = refused(run_cli, write_config, lora_zoo, tmp_path, adapter)
    assert "modules_to_save tensor score.weight has no counterpart in the base" in err


def test_nan_in_adapter_weights_names_the_tensor(lora_zoo, tmp_path, run_cli, write_config):
    tensors = adapter_tensors(lora_zoo)
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    err = refused(run_cli, write_config, lora_zoo, tmp_path, broken_adapter(lora_zoo, tmp_path, tensors=tensors))
    assert f"tensor {key} contains NaN or Inf" in err


def test_a_written_adapter_is_what_peft_reads(lora_zoo, tmp_path):
    """write_random_lora (used by the benchmark) writes the layout peft loads, with the same merged weights."""
    from peft import PeftModel

    from merging.io.hf_loading import load_causal_lm

    adapter = write_random_lora(lora_zoo["base"], tmp_path / "written", seed=4, rank=3)
    model = PeftModel.from_pretrained(load_causal_lm(lora_zoo["base"]), adapter).merge_and_unload()
    expert, reader = LoraAdapter(adapter), CheckpointReader(lora_zoo["base"])
    state = model.state_dict()
    for name in reader.names():
        torch.testing.assert_close(expert.weights(name, reader), state[name], rtol=0, atol=1e-6, msg=name)


def test_lora_rank_output_is_an_adapter_with_the_svd_error_it_reports(lora_zoo, tmp_path, run_cli, write_config):
    config = write_config(base=lora_zoo["base"], experts=lora_zoo["adapters"], method="task_arithmetic",
                          params={"lambda": 0.7})
    assert run_cli("merge", config, tmp_path / "dense")[0] == 0
    # the three adapters have ranks 2, 4, 6: their weighted sum has rank <= 12, kept whole at rank 12
    status, out, err = run_cli("merge", config, tmp_path / "r12", "--lora-rank", 12)
    assert status == 0, err
    exact = json.loads((tmp_path / "r12" / "lora_export.json").read_text())
    assert exact["relative_error"] < 1e-5 and exact["tensors"] == 6 and "relative error" in out
    assert not list(tmp_path.glob(".r12*"))  # the dense merge was temporary
    status, _, err = run_cli("merge", config, tmp_path / "r1", "--lora-rank", 1)
    truncated = json.loads((tmp_path / "r1" / "lora_export.json").read_text())
    assert status == 0 and 0.3 < truncated["relative_error"] < 1
    reapplied = merge(MergeConfig(base=lora_zoo["base"], experts=[ExpertRef(path=tmp_path / "r12")],
                                  method="average"), tmp_path / "reapplied")
    dense = read_all(tmp_path / "dense")
    for name, tensor in read_all(reapplied).items():
        torch.testing.assert_close(tensor, dense[name], rtol=0, atol=1e-5, msg=name)
    from peft import PeftModel

    from merging.io.hf_loading import load_causal_lm

    loaded = PeftModel.from_pretrained(load_causal_lm(lora_zoo["base"]), tmp_path / "r1").merge_and_unload()
    ours = read_all(merge(MergeConfig(base=lora_zoo["base"], experts=[ExpertRef(path=tmp_path / "r1")],
                                      method="average"), tmp_path / "r1-dense"))
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, ours[name], rtol=0, atol=1e-6, msg=name)  # peft reads it as we do
