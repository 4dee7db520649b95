"""params.lora_out: a calibrated merge of LoRA experts written as one PEFT adapter that peft loads to the dense
merge's logits; bad input refused before calibrating; the serving-rank warning."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from merging.calibration.adapter_output import check_lora_experts, warn_high_rank
from merging.errors import ConfigError
from merging.experts import LoraAdapter
from merging.io.checkpoint import CheckpointReader
from merging.io.hf_loading import load_causal_lm

DOMAINS = ["algebra", "code", "biology"]
FAST = {"samples_per_expert": 3, "grad_accumulation": 3, "epochs": 2, "gamma": 0.8}  # γ fixed: auto is tested apart
# different ranks, one rsLoRA, one embedding LoRA, one modules_to_save copy of a layer another adapter factors
LORA = {
    "algebra": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "down_proj"]},
    "code": {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "o_proj", "up_proj",
                                                                                 "embed_tokens"]},
    "biology": {"r": 3, "lora_alpha": 3, "target_modules": ["q_proj", "gate_proj"], "modules_to_save": ["k_proj"]},
}
EMBEDDINGS_CALIBRATED = ["*lm_head*", "*norm*", "*.bias"]  # the default exclusions, less the embeddings


def make_adapter(base, folder, seed, **lora):
    """A peft adapter with random nonzero A and B, and a modules_to_save copy that differs from the base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    adapted = get_peft_model(load_causal_lm(base), LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.mul_(0.2)  # a perturbation of the base, not a new model
            elif "modules_to_save" in name:
                parameter.add_(0.02 * torch.randn_like(parameter))
    adapted.save_pretrained(folder)
    config_path = folder / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"base_model_name_or_path": str(base)}))
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_out_experts")
    return [make_adapter(tiny_zoo / "base", root / name, seed, **LORA[name]) for seed, name in enumerate(DOMAINS, 1)]


@pytest.fixture()
def lora_config(tiny_zoo, adapters, write_config):
    def make(method: str, experts=None, **params):
        return write_config(base=tiny_zoo / "base", experts=experts or adapters, method=method,
                            calibration={d: str(tiny_zoo / "data" / d / "calib.jsonl") for d in DOMAINS},
                            params={**FAST, "lora_out": True, **params})
    return make


def merge_and_apply(config, tmp_path, run_cli):
    """The adapter (merge with lora_out), and the dense checkpoint of the same coefficients (mergeplan apply)."""
    status, _, err = run_cli("merge", config, tmp_path / "adapter")
    assert status == 0, err
    status, _, err = run_cli("apply", tmp_path / "adapter" / "coefficients.json", "-o", tmp_path / "dense")
    assert status == 0, err
    return tmp_path / "adapter", tmp_path / "dense"


def assert_same_logits(base, adapter, dense):
    from peft import PeftModel

    ids = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model = load_causal_lm(base).eval()
        base_logits = model(ids).logits
        adapted_logits = PeftModel.from_pretrained(model, adapter).eval()(ids).logits
        dense_logits = load_causal_lm(dense).eval()(ids).logits
    assert (dense_logits - base_logits).abs().max() > 0.05  # the merge moved the model: the check means something
    torch.testing.assert_close(adapted_logits, dense_logits, atol=1e-5, rtol=0)


def test_expert_merging_adapter_loads_in_peft_to_the_dense_merge(lora_config, tiny_zoo, tmp_path, run_cli):
    adapter, dense = merge_and_apply(lora_config("expert_merging", exclude=EMBEDDINGS_CALIBRATED), tmp_path, run_cli)
    for name in ("adapter_config.json", "adapter_model.safetensors", "coefficients.json", "coefficients.png",
                 "calibration.json"):
        assert (adapter / name).is_file(), name
    assert not (adapter / "model.safetensors").exists()
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["peft_type"] == "LORA" and settings["base_model_name_or_path"] == str(tiny_zoo / "base")
    assert settings["r"] == settings["lora_alpha"] == 4 + 2 + 3  # q_proj: every adapter's rank, stacked
    # other modules: the ranks of the adapters that touch them, alpha = rank (scale 1)
    assert settings["rank_pattern"] == settings["alpha_pattern"] == {
        **{f"model.layers.{i}.{m}": r for i in range(2) for m, r in [("self_attn.v_proj", 4), ("mlp.down_proj", 4),
                                                                    ("self_attn.o_proj", 2), ("mlp.up_proj", 2),
                                                                    ("mlp.gate_proj", 3)]},
        "model.embed_tokens": 2}
    # k_proj: factored by algebra, saved whole by biology: written whole, merged, through modules_to_save
    assert settings["modules_to_save"] == [f"model.layers.{i}.self_attn.k_proj" for i in range(2)]
    assert "model.layers.0.self_attn.k_proj" not in settings["target_modules"]
    report = json.loads((adapter / "calibration.json").read_text())
    assert report["lora_out"]["rank"] == 9
    assert_same_logits(tiny_zoo / "base", adapter, dense)


def test_em_pp_row_blocks_become_scaled_rows_of_b(lora_config, tiny_zoo, tmp_path, run_cli):
    adapter, dense = merge_and_apply(lora_config("expert_merging_pp", budget=3.0, kappa=2.0), tmp_path, run_cli)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    coefficients = json.loads((adapter / "coefficients.json").read_text())["tensors"]
    chunked = [n for n, entry in coefficients.items()
               if entry["chunks"] > 1 and n.removesuffix(".weight") in settings["target_modules"]]
    assert chunked, {n: e["chunks"] for n, e in coefficients.items()}
    assert settings["modules_to_save"] == [f"model.layers.{i}.self_attn.k_proj" for i in range(2)]
    assert "model.embed_tokens" not in settings["target_modules"]  # excluded (the default): left at the base's value
    # tensor by tensor: B_cat @ A_cat is exactly the dense merge's update, row blocks and all
    factors = load_file(adapter / "adapter_model.safetensors")
    base, merged = CheckpointReader(tiny_zoo / "base"), CheckpointReader(dense)
    for name in chunked:
        module = "base_model.model." + name.removesuffix(".weight")
        update = factors[module + ".lora_B.weight"] @ factors[module + ".lora_A.weight"]
        torch.testing.assert_close(update, merged.read(name) - base.read(name), atol=1e-6, rtol=0)
    assert_same_logits(tiny_zoo / "base", adapter, dense)


def test_a_full_checkpoint_among_the_experts_is_refused_before_calibrating(lora_config, tiny_zoo, adapters,
                                                                         tmp_path, run_cli, monkeypatch):
    import merging.merger

    monkeypatch.setattr(merging.merger, "calibrate", lambda *a, **k: pytest.fail("calibrated before refusing"))
    full = tiny_zoo / "experts" / "code"
    config = lora_config("expert_merging", experts=[adapters[0], full, adapters[2]])
    status, _, err = run_cli("merge", config, tmp_path / "out")
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and str(full) in err and "lora_out: false" in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def edited_copy(folder, to, filename, **fields):
    copy = shutil.copytree(folder, to)
    (copy / filename).write_text(json.dumps(json.loads((copy / filename).read_text()) | fields))
    return copy


def test_fan_in_fan_out_factors_of_a_calibrated_tensor_are_refused_by_name(tiny_zoo, adapters, tmp_path):
    adapter = LoraAdapter(edited_copy(adapters[0], tmp_path / "conv1d", "adapter_config.json", fan_in_fan_out=True))
    base = CheckpointReader(tiny_zoo / "base")
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight .*fan_in_fan_out"):
        check_lora_experts([adapter], ["model.layers.0.self_attn.q_proj.weight"], base, "merge.yaml")
    assert check_lora_experts([adapter], ["model.norm.weight"], base, "merge.yaml") == [adapter]  # not calibrated


def test_an_embedding_tied_to_the_output_layer_is_refused_by_name(tiny_zoo, adapters, tmp_path):
    adapter = LoraAdapter(adapters[1])  # code: a LoRA on embed_tokens
    untied = CheckpointReader(tiny_zoo / "base")
    tied = CheckpointReader(edited_copy(tiny_zoo / "base", tmp_path / "tied", "config.json", tie_word_embeddings=True))
    assert check_lora_experts([adapter], ["model.embed_tokens.weight"], untied, "merge.yaml") == [adapter]
    # the dense merge would move lm_head with the embedding; peft's embedding LoRA does not
    with pytest.raises(ConfigError, match=r"ties its output layer to model\.embed_tokens\.weight"):
        check_lora_experts([adapter], ["model.embed_tokens.weight"], tied, "merge.yaml")


def test_rank_above_what_serving_engines_load_is_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        assert not warn_high_rank({"model.layers.0.self_attn.q_proj": 512, "model.layers.0.mlp.up_proj": 8})
        assert not caplog.records
        assert warn_high_rank({"model.layers.0.self_attn.q_proj": 520, "model.layers.0.mlp.up_proj": 8})
    (record,) = caplog.records
    assert "rank 520 (model.layers.0.self_attn.q_proj)" in record.message
    assert "serving engines usually cap LoRA rank at 512 (vLLM max_lora_rank)" in record.message
