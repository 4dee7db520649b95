"""Evaluation: response-only token-weighted CE checked by hand, accuracy parsing, bad input."""

import json

import pytest
import torch

from merging.data.example import Example, write_jsonl
from merging.data.loading import encode, load_examples
from merging.errors import ConfigError
from merging.evaluate import EvalResult, cross_entropy, evaluate, extract_answer
from merging.io.hf_loading import load_causal_lm, load_tokenizer


def test_ce_counts_response_tokens_only(tiny_zoo):
    model, tokenizer = load_causal_lm(tiny_zoo / "base"), load_tokenizer(tiny_zoo / "base")
    examples = [Example("Compute 2 + 3.", "2 + 3 = 5\nAnswer: 5", "5"), Example("Hi", "there, a longer reply", None)]
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            encoded = encode(tokenizer, example, 128)
            logits = model(torch.tensor([encoded.ids])).logits[0]
            for position in range(1, len(encoded.ids)):
                if encoded.response_mask[position]:
                    total -= float(torch.log_softmax(logits[position - 1], -1)[encoded.ids[position]])
                    count += 1
    ce, tokens = cross_entropy(model, tokenizer, examples, batch_size=2, max_length=128)
    assert tokens == count
    assert ce == pytest.approx(total / count, rel=1e-5)


def test_extract_answer_takes_the_last_answer_line():
    assert extract_answer("x = 5\nAnswer: 5\n") == "5"
    assert extract_answer("Answer: 1\nthen\nAnswer:  MC  ") == "MC"
    assert extract_answer("no answer here") is None


def test_evaluate_reports_domains_macro_micro_and_accuracy(tiny_zoo):
    result = evaluate(tiny_zoo / "experts" / "algebra", tiny_zoo / "data", domains=["algebra", "code"],
                      accuracy_samples=4, max_examples=12)
    assert [d.domain for d in result.domains] == ["algebra", "code"]
    assert all(d.examples == 12 and d.accuracy_examples == 4 and 0 <= d.accuracy <= 1 for d in result.domains)
    ces, tokens = [d.ce for d in result.domains], [d.tokens for d in result.domains]
    assert result.macro_ce == pytest.approx(sum(ces) / 2)
    assert result.micro_ce == pytest.approx((ces[0] * tokens[0] + ces[1] * tokens[1]) / sum(tokens))
    assert result.ce("algebra") < result.ce("code")  # the algebra expert knows algebra best
    restored = EvalResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert restored == result and restored.macro_ce == result.macro_ce


def test_bfloat16_evaluation_is_close_to_float32(tiny_zoo):
    options = {"domains": ["physics"], "max_examples": 16}
    full = evaluate(tiny_zoo / "base", tiny_zoo / "data", **options)
    half = evaluate(tiny_zoo / "base", tiny_zoo / "data", dtype="bfloat16", **options)
    assert half.ce("physics") == pytest.approx(full.ce("physics"), rel=0.03)


def test_cli_single_model_json(tiny_zoo, tmp_path, run_cli):
    status, out, err = run_cli("evaluate", tiny_zoo / "experts" / "biology", "--data", tiny_zoo / "data",
                               "--domains", "biology", "--json", tmp_path / "ce.json", "--accuracy-samples", "2")
    assert status == 0, err
    scores = json.loads((tmp_path / "ce.json").read_text())
    assert scores["domains"][0]["domain"] == "biology" and scores["macro_ce"] == scores["domains"][0]["ce"]
    assert "biology          CE" in out


def test_user_text_and_jsonl_folders_load_alike(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("First paragraph line one.\nline two.\n\nSecond paragraph.\n")
    write_jsonl(folder / "more.jsonl", [Example("Q?", "A.", "A")])
    (folder / "raw.jsonl").write_text('{"text": "plain text row"}\n')
    examples = load_examples(folder)
    assert Example("Q?", "A.", "A") in examples and Example("", "plain text row") in examples
    assert any(e.response.startswith("First paragraph") and "line two" in e.response for e in examples)
    assert any(e.response.strip() == "Second paragraph." for e in examples)


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.mkdir(), "no .jsonl or .txt files in this folder"),
    (lambda p: (p.mkdir(), (p / "eval.jsonl").write_text("")), "empty data file"),
    (lambda p: (p.mkdir(), (p / "eval.txt").write_text("\n\n  \n")), "no text in these data files"),
    (lambda p: (p.mkdir(), (p / "eval.jsonl").write_text('{"question": 1}\n')), "neither 'response' nor 'text'"),
])
def test_bad_data_files(tmp_path, make, message):
    make(tmp_path / "data")
    with pytest.raises(ConfigError, match=message):
        load_examples(tmp_path / "data")


def test_eval_of_a_model_that_is_not_a_causal_lm(tiny_zoo, tmp_path, copy_model, run_cli):
    model = copy_model(tiny_zoo / "base", "encoder")
    config = json.loads((model / "config.json").read_text()) | {"architectures": ["BertModel"]}
    (model / "config.json").write_text(json.dumps(config))
    status, _, err = run_cli("evaluate", model, "--data", tiny_zoo / "data")
    assert status == 2 and "is not a causal LM (*ForCausalLM)" in err


def test_model_whose_vocabulary_does_not_match_the_tokenizer(tiny_zoo, tmp_path, run_cli):
    from merging.io.synthetic import llama_config, write_random_base

    model = write_random_base(tmp_path / "small_vocab", llama_config(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        dtype="float32"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((tiny_zoo / "tokenizer" / name).read_bytes())
    status, _, err = run_cli("evaluate", model, "--data", tiny_zoo / "data")
    assert status == 2 and "vocab_size is 100 but its tokenizer has" in err


def test_missing_domain_and_data_folder(tiny_zoo, tmp_path, run_cli):
    status, _, err = run_cli("evaluate", tiny_zoo / "base", "--data", tiny_zoo / "data", "--domains", "poetry")
    assert status == 2 and "no data for domain 'poetry'" in err
    status, _, err = run_cli("evaluate", tiny_zoo / "base", "--data", tmp_path / "none")
    assert status == 2 and "no such data folder" in err
