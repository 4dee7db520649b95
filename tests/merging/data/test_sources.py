"""Domain data from any source: the user's files, synthetic generators, real text; and a zoo built from a mix."""

import json
import logging

import pytest

from merging.data import corpora
from merging.data.example import Example, write_jsonl
from merging.data.sources import domain_splits
from merging.errors import ConfigError
from merging.zoo.presets import PRESETS, Phase, get_preset

SIZES = {"train": 12, "calib": 2, "eval": 4}


@pytest.fixture()
def user_data(tmp_path):
    folder = tmp_path / "mine" / "recipes"
    examples = [Example(f"Recipe {i}?", f"Mix {i} eggs.\nAnswer: {i}", str(i)) for i in range(10)]
    write_jsonl(folder / "part1.jsonl", examples)
    (folder / "part2.txt").write_text("\n\n".join(f"Paragraph {i} about baking bread." for i in range(10)))
    return tmp_path / "mine"


def test_user_folder_splits_are_seeded_and_disjoint(user_data):
    splits = domain_splits("recipes", SIZES, seed=0, chunk_chars=256, user_data=user_data)
    assert {k: len(v) for k, v in splits.items()} == SIZES
    responses = [e.response for examples in splits.values() for e in examples]
    assert len(set(responses)) == len(responses) == 18
    assert splits == domain_splits("recipes", SIZES, seed=0, chunk_chars=256, user_data=user_data)
    assert splits != domain_splits("recipes", SIZES, seed=1, chunk_chars=256, user_data=user_data)


def test_a_short_user_folder_is_scaled_down_with_a_warning(user_data, caplog):
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        splits = domain_splits("recipes", {"train": 100, "calib": 5, "eval": 20}, 0, 256, user_data)
    assert sum(len(v) for v in splits.values()) == 20 and all(splits.values())
    assert "splits scaled down" in caplog.text


def test_unknown_domain_names_every_choice(tmp_path):
    with pytest.raises(ConfigError, match="unknown domain 'poetry'; choose from the synthetic algebra, .* the "
                                          "real-text python_stdlib, .*, or a folder in"):
        domain_splits("poetry", SIZES, 0, 256, tmp_path)


def test_absent_real_text_source_is_skipped(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(corpora.SOURCE_ROOTS, "licenses", tmp_path / "absent")
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        assert domain_splits("licenses", SIZES, 0, 256) == {}
    assert "real-text domain 'licenses' skipped: no source at" in caplog.text


def test_zoo_from_synthetic_real_text_and_user_domains(tmp_path, user_data, monkeypatch, run_cli):
    licenses = tmp_path / "licenses"
    licenses.mkdir()
    for i in range(6):
        clauses = (f"Clause {i}.{j}: the licensee may copy and share." for j in range(40))
        (licenses / f"L{i}").write_text("\n".join(clauses))
    monkeypatch.setitem(corpora.SOURCE_ROOTS, "licenses", licenses)
    monkeypatch.setitem(corpora.SOURCE_ROOTS, "man_pages", tmp_path / "no-man-pages")
    preset = get_preset("tiny").model_copy(update={
        "split_sizes": SIZES, "base": Phase(steps=4, batch_size=4, lr=1e-3, warmup_steps=1),
        "expert": Phase(steps=2, batch_size=4, lr=1e-3, warmup_steps=1)})
    monkeypatch.setitem(PRESETS, "tiny", preset)
    status, out, err = run_cli("zoo", "build", "--preset", "tiny", "--out", tmp_path / "zoo", "--data", user_data,
                               "--domains", "algebra,licenses,recipes,man_pages")
    assert status == 0, err
    manifest = json.loads((tmp_path / "zoo" / "manifest.json").read_text())
    assert manifest["domains"] == ["algebra", "licenses", "recipes"]  # man_pages is absent: left out
    assert {"experts/algebra", "experts/licenses", "experts/recipes", "base", "mixture"} == set(manifest["models"])
    licence_text = (tmp_path / "zoo" / "data" / "licenses" / "eval.jsonl").read_text()
    assert "licensee may copy" in licence_text
