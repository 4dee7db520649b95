"""The tiny zoo: built once per session from scratch (data, tokenizer, base, nine experts, mixture)."""

import json

import pytest
import torch

from merging.data.domains import DOMAINS
from merging.errors import ConfigError
from merging.evaluate import evaluate
from merging.io.hf_loading import load_causal_lm, load_tokenizer
from merging.zoo.build import build_zoo
from merging.zoo.layout import folder_hashes, zoo_families
from merging.zoo.presets import PRESETS, Phase, get_preset


def test_manifest_records_every_model_with_its_hashes(tiny_zoo):
    manifest = json.loads((tiny_zoo / "manifest.json").read_text())
    assert set(manifest["models"]) == {"base", "mixture", *(f"experts/{d}" for d in DOMAINS)}
    for name, entry in manifest["models"].items():
        assert entry["sha256"] == folder_hashes(tiny_zoo / name)
        assert entry["training"]["last_loss"] < entry["training"]["first_loss"], name
    assert manifest["preset"]["name"] == "tiny" and manifest["preset"]["seed"] == 0
    assert set(manifest["data"]) == set(DOMAINS)


def test_models_and_tokenizer_load_with_auto_classes(tiny_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_zoo / "tokenizer")
    ids = tokenizer.encode("Solve for x: 3x + 7 = 22", add_special_tokens=False)
    assert tokenizer.decode(ids) == "Solve for x: 3x + 7 = 22"
    model = AutoModelForCausalLM.from_pretrained(tiny_zoo / "experts" / "code")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 50_000 < model.num_parameters() < 300_000  # "about 0.2M parameters"
    assert model.config.vocab_size == len(tokenizer)


def test_a_second_build_reuses_everything(tiny_zoo, monkeypatch):
    before = (tiny_zoo / "manifest.json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a model was retrained")

    monkeypatch.setattr("merging.zoo.build.train", no_training)
    build_zoo("tiny", tiny_zoo)
    after = json.loads((tiny_zoo / "manifest.json").read_text())
    assert after["models"] == json.loads(before)["models"]


def test_the_same_preset_and_seed_give_bit_identical_models(tmp_path):
    preset = get_preset("tiny").model_copy(update={
        "domains": ("algebra", "code"), "split_sizes": {"train": 40, "calib": 2, "eval": 4},
        "base": Phase(steps=6, batch_size=4, lr=1e-3, warmup_steps=2),
        "expert": Phase(steps=3, batch_size=4, lr=1e-3, warmup_steps=1)})
    first = json.loads(build_zoo(preset, tmp_path / "a").read_text())["models"]
    second = json.loads(build_zoo(preset, tmp_path / "b").read_text())["models"]
    assert {k: v["sha256"] for k, v in first.items()} == {k: v["sha256"] for k, v in second.items()}
    other_seed = json.loads(build_zoo(preset.model_copy(update={"seed": 1}), tmp_path / "c").read_text())["models"]
    assert other_seed["base"]["sha256"] != first["base"]["sha256"]


def test_each_expert_beats_the_base_on_its_own_domain(tiny_zoo):
    base = evaluate(tiny_zoo / "base", tiny_zoo / "data")
    for domain in DOMAINS:
        expert = evaluate(tiny_zoo / "experts" / domain, tiny_zoo / "data", domains=[domain])
        assert expert.ce(domain) < 0.95 * base.ce(domain), domain


def test_zoo_families_name_the_experts_after_their_folders(tiny_zoo, tmp_path):
    [family] = zoo_families(tiny_zoo)
    assert family.name == "tiny" and family.base == tiny_zoo / "base"
    assert family.experts == tuple((domain, tiny_zoo / "experts" / domain) for domain in sorted(DOMAINS))
    with pytest.raises(ConfigError, match="not a zoo folder"):
        zoo_families(tmp_path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset .huge.; choose one of tiny, small, real, sizes"):
        get_preset("huge")


def test_presets_span_the_sizes_the_issue_asks_for():
    from merging.zoo.build import new_model

    class Vocab:
        def __init__(self, size):
            self.size, self.bos_token_id, self.eos_token_id, self.pad_token_id = size, 0, 1, 2

        def __len__(self):
            return self.size

    def parameters(preset, size):
        return new_model(size, Vocab(preset.vocab_size), preset.max_length, 0).num_parameters()

    small = PRESETS["small"]
    assert 1.5e6 < parameters(small, small.sizes[0]) < 3e6
    counts = [parameters(PRESETS["sizes"], size) for size in PRESETS["sizes"].sizes]
    assert counts == sorted(counts) and counts[-1] / counts[0] >= 8


def test_the_tokenizer_has_the_special_tokens(tiny_zoo):
    tokenizer = load_tokenizer(tiny_zoo / "tokenizer")
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    model = load_causal_lm(tiny_zoo / "base")
    assert model.dtype == torch.float32


def test_a_failed_training_leaves_no_model_and_no_partial_folder(tmp_path, monkeypatch):
    preset = get_preset("tiny").model_copy(update={
        "domains": ("algebra",), "split_sizes": {"train": 20, "calib": 2, "eval": 4},
        "base": Phase(steps=2, batch_size=4, lr=1e-3, warmup_steps=1)})

    def diverge(*args, **kwargs):
        raise FloatingPointError("loss is NaN")

    monkeypatch.setattr("merging.zoo.build.train", diverge)
    with pytest.raises(FloatingPointError):
        build_zoo(preset, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "tokenizer"]
    assert not list(tmp_path.rglob(".*partial*"))


def test_a_diverging_loss_stops_training_with_the_step(tiny_zoo):
    from merging.data.domains import generate
    from merging.data.loading import encode
    from merging.errors import TrainingError
    from merging.zoo.training import TrainSettings, train

    model, tokenizer = load_causal_lm(tiny_zoo / "base"), load_tokenizer(tiny_zoo / "base")
    examples = [encode(tokenizer, e, 64) for e in generate("algebra", 8, 0)]
    with pytest.raises(TrainingError, match=r"experiment: loss is (nan|inf) at step \d+; lower the learning rate"):
        train(model, examples, TrainSettings(steps=3, batch_size=4, lr=1e30), tokenizer.pad_token_id, 0,
              label="experiment")
