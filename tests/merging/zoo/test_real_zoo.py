"""The `real` zoo's pieces without the 98 MB GGUF: a tiny GGUF written here and imported, a pretrained base
taken from a folder, LoRA experts and mixture trained with peft, cached and bit-identical."""

import json

import pytest
import torch
from gguf_files import write_llama_gguf, write_metadata_only_gguf

from merging import MergeConfig, merge
from merging.errors import ConfigError
from merging.evaluate import evaluate
from merging.experts import is_adapter
from merging.io.hf_loading import load_causal_lm, load_tokenizer
from merging.zoo.build import build_zoo
from merging.zoo.presets import Phase, get_preset

pytest.importorskip("gguf")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_zoo, tmp_path_factory):
    return write_llama_gguf(tiny_zoo / "base", tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_import_gguf_gives_the_same_model_and_tokenizer(tiny_zoo, tiny_gguf, tmp_path, run_cli):
    status, out, err = run_cli("base", "import-gguf", tiny_gguf, "--out", tmp_path / "imported")
    assert status == 0, err
    folder = tmp_path / "imported"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in folder.iterdir()}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    ids = torch.tensor([[1, 5, 9, 33, 2, 17]])
    with torch.no_grad():
        expected = load_causal_lm(tiny_zoo / "base")(input_ids=ids).logits
        imported = load_causal_lm(folder)(input_ids=ids).logits
    assert torch.equal(imported, expected)
    text = "Solve for x: 3x + 7 = 22"
    assert (load_tokenizer(folder).encode(text, add_special_tokens=False)
            == load_tokenizer(tiny_zoo / "base").encode(text, add_special_tokens=False))


@pytest.mark.parametrize(("damage", "message"), [
    ("missing", "no such GGUF file"),
    ("truncated", "truncated or corrupt GGUF file"),
    ("header_only", "truncated GGUF file (20 bytes)"),
    ("not_gguf", "not a GGUF file (no GGUF header)"),
    ("gpt2", "architecture 'gpt2' is not supported; mergeplan imports llama, mistral, qwen2, qwen3"),
])
def test_bad_gguf_files_are_one_line_errors_and_write_nothing(tiny_gguf, tmp_path, run_cli, damage, message):
    path = tmp_path / "model.gguf"
    data = tiny_gguf.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 10])
    elif damage == "header_only":
        path.write_bytes(data[:20])
    elif damage == "not_gguf":
        path.write_text('{"not": "gguf"}')
    elif damage == "gpt2":
        write_metadata_only_gguf(path, "gpt2")
    status, _, err = run_cli("base", "import-gguf", path, "--out", tmp_path / "out")
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def tiny_real_preset():
    return get_preset("real").model_copy(update={
        "domains": ("algebra", "code"), "split_sizes": {"train": 32, "calib": 2, "eval": 8},
        "expert": Phase(steps=16, batch_size=8, lr=1e-2, warmup_steps=2)})


@pytest.fixture(scope="module")
def lora_zoo_dir(tiny_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("real_zoo")
    build_zoo(tiny_real_preset(), root, base=tiny_zoo / "base", device="cpu")
    return root


def test_real_preset_trains_lora_experts_and_a_mixture_on_the_pretrained_base(lora_zoo_dir, tiny_zoo):
    manifest = json.loads((lora_zoo_dir / "manifest.json").read_text())
    assert set(manifest["models"]) == {"base", "experts/algebra", "experts/code", "mixture"}
    for name in ("experts/algebra", "experts/code", "mixture"):
        folder = lora_zoo_dir / name
        assert is_adapter(folder) and not (folder / "model.safetensors").exists()
        training = manifest["models"][name]["training"]
        assert training["last_loss"] < training["first_loss"], name
        assert training["trained_parameters"] < training["parameters"] / 5
    assert json.loads((lora_zoo_dir / "experts/code/adapter_config.json").read_text())[
        "base_model_name_or_path"] == "../../base"
    base = evaluate(lora_zoo_dir / "base", lora_zoo_dir / "data")
    expert = evaluate(lora_zoo_dir / "experts" / "code", lora_zoo_dir / "data", domains=["code"])
    assert expert.ce("code") < base.ce("code")
    merged = merge(MergeConfig(base=lora_zoo_dir / "base", experts=[lora_zoo_dir / "experts" / d
                                                                    for d in ("algebra", "code")], method="average"),
                   lora_zoo_dir / "merged")
    assert evaluate(merged, lora_zoo_dir / "data").macro_ce < base.macro_ce


def test_real_preset_reuses_what_it_built_and_is_bit_identical_for_the_seed(lora_zoo_dir, tiny_zoo, tmp_path,
                                                                          monkeypatch):
    first = json.loads((lora_zoo_dir / "manifest.json").read_text())["models"]
    again = json.loads(build_zoo(tiny_real_preset(), tmp_path / "again", base=tiny_zoo / "base",
                                 device="cpu").read_text())["models"]
    assert {k: v["sha256"] for k, v in again.items()} == {k: v["sha256"] for k, v in first.items()}

    def no_training(*args, **kwargs):
        raise AssertionError("a model was retrained")

    monkeypatch.setattr("merging.zoo.build.train", no_training)
    build_zoo(tiny_real_preset(), lora_zoo_dir, base=tiny_zoo / "base", device="cpu")


def test_real_preset_refuses_a_base_that_is_not_a_causal_lm(tiny_zoo, tmp_path):
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ConfigError, match=r"architectures \['BertModel'\] is not a causal LM"):
        build_zoo(tiny_real_preset(), tmp_path / "zoo", base=tmp_path / "encoder", device="cpu")
    with pytest.raises(ConfigError, match="trains its own base; --base and --base-gguf are for presets with LoRA"):
        build_zoo("tiny", tmp_path / "zoo2", base=tiny_zoo / "base")
