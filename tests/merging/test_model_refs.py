"""Model references (folders, hub ids, @revisions, MODEL+LORA, mergekit's dict form) resolved offline: against a
Hugging Face cache laid out as huggingface_hub lays it out, a --model-dir; and the one-line errors."""

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from merging.errors import CheckpointError, ConfigError
from merging.io.checkpoint import CheckpointReader
from merging.io.synthetic import llama_config, write_random_base
from merging.model_refs import ModelResolver, ResolvedModel

FIELD = "merge.yaml: models[1].model"
C_MAIN, C_TAG, C_OLD, C_PR = (hashlib.sha1(name.encode()).hexdigest() for name in ("main", "v1", "old", "pr"))


@pytest.fixture(autouse=True)
def no_cache_env(monkeypatch, tmp_path):
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def cached_repo(cache: Path, repo_id: str, snapshots: dict[str, str], refs: dict[str, str]) -> Path:
    """A repo in a hub cache as huggingface_hub writes it: blobs/SHA, snapshots/COMMIT/FILE -> ../../blobs/SHA,
    refs/NAME holding the commit (no newline). Each snapshot's config.json holds its MARKER."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for commit, marker in snapshots.items():
        blob = repo / "blobs" / hashlib.sha256(marker.encode()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_text(f'{{"marker": "{marker}"}}')
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").symlink_to(os.path.relpath(blob, snapshot))
    for name, commit in refs.items():
        (repo / "refs" / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(commit)
    return repo


def marker(folder: Path) -> str:
    return (folder / "config.json").read_text().split('"')[3]


def folder(path: Path, text: str = "local") -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(f'{{"marker": "{text}"}}')
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cached_repo(cache, "org/model", {C_MAIN: "main", C_TAG: "v1", C_OLD: "old", C_PR: "pr"},
                {"main": C_MAIN, "v1": C_TAG, "refs/pr/1": C_PR})
    cached_repo(cache, "org/adapter", {C_TAG: "adapter-v2"}, {"main": C_TAG, "v2": C_TAG})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_main_a_tag_a_pr_ref_and_a_commit_hash_select_their_snapshots(tmp_path, cache):
    resolver = ModelResolver(tmp_path / "configs")
    snapshots = cache / "models--org--model" / "snapshots"
    expected = {"org/model": "main", "org/model@main": "main", "org/model@v1": "v1", f"org/model@{C_OLD}": "old",
                "org/model@refs/pr/1": "pr"}
    for reference, wanted in expected.items():
        resolved = resolver.resolve(reference, FIELD)
        assert marker(resolved.path) == wanted, reference
        assert resolved.path.parent == snapshots and resolved.lora is None and resolved.name == "model"
    # mergekit's dict forms: {model: ModelPath}, ModelPath as {path, revision}
    assert marker(resolver.resolve({"model": "org/model@v1"}, FIELD).path) == "v1"
    assert marker(resolver.resolve({"model": {"path": "org/model", "revision": C_OLD}}, FIELD).path) == "old"


def test_hf_hub_cache_beats_hf_home_which_beats_the_home_cache(tmp_path, monkeypatch):
    cached_repo(tmp_path / "explicit", "org/model", {C_MAIN: "hub-cache"}, {"main": C_MAIN})
    cached_repo(tmp_path / "hf_home" / "hub", "org/model", {C_MAIN: "hf-home"}, {"main": C_MAIN})
    cached_repo(tmp_path / "home" / ".cache" / "huggingface" / "hub", "org/model", {C_MAIN: "home"}, {"main": C_MAIN})

    def found() -> str:
        return marker(ModelResolver(tmp_path).resolve("org/model", FIELD).path)

    assert found() == "home"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    assert found() == "hf-home"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "explicit"))
    assert found() == "hub-cache"


def test_model_dir_folders_then_its_cache_layout_come_before_the_hf_cache(tmp_path, cache):
    model_dir = tmp_path / "models"
    cached_repo(model_dir, "org/model", {C_TAG: "dir-cache-v1"}, {"v1": C_TAG})
    resolver = ModelResolver(tmp_path, model_dir=model_dir)
    assert marker(resolver.resolve("org/model@v1", FIELD).path) == "dir-cache-v1"
    assert marker(resolver.resolve("org/model", FIELD).path) == "main"  # no refs/main in model_dir: the HF cache
    folder(model_dir / "model", "dir-name")
    assert marker(resolver.resolve("org/model", FIELD).path) == "dir-name"
    folder(model_dir / "org" / "model", "dir-org-name")
    assert resolver.resolve("org/model@v1", FIELD) == ResolvedModel(path=model_dir / "org" / "model", name="model")


def test_an_existing_local_folder_beats_a_hub_id_spelled_the_same(tmp_path, cache, caplog):
    configs = tmp_path / "configs"
    folder(configs / "org" / "model", "local")
    resolver = ModelResolver(configs)
    assert resolver.resolve("org/model", FIELD) == ResolvedModel(path=configs / "org" / "model", name="model")
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        assert marker(resolver.resolve("org/model@v1", FIELD).path) == "local"
    assert "is a local folder; revision v1 ignored" in caplog.text
    absolute = folder(tmp_path / "elsewhere" / "ckpt")
    assert resolver.resolve(str(absolute), FIELD).path == absolute
    assert resolver.resolve("../elsewhere/ckpt", FIELD).path == absolute  # relative to the YAML's folder


def test_model_plus_lora_resolves_both_halves(tmp_path, cache):
    configs = tmp_path / "configs"
    local_model, local_lora = folder(configs / "m"), folder(configs / "adapters" / "l")
    resolver = ModelResolver(configs)
    snapshots = cache / "models--org--model" / "snapshots"
    assert resolver.resolve("org/model@v1+org/adapter@v2", FIELD) == ResolvedModel(
        path=snapshots / C_TAG, lora=cache / "models--org--adapter" / "snapshots" / C_TAG, name="model+adapter")
    assert resolver.resolve("m+adapters/l", FIELD) == ResolvedModel(path=local_model, lora=local_lora, name="m+l")
    mixed = resolver.resolve({"model": {"path": "org/model"}, "lora": "adapters/l"}, FIELD)
    assert (mixed.path, mixed.lora) == (snapshots / C_MAIN, local_lora)


def test_a_missing_hub_id_is_one_line_naming_the_id_its_revision_every_place_searched_and_the_fixes(tmp_path,
                                                                                                     cache):
    configs, model_dir = tmp_path / "configs", tmp_path / "models"
    model_dir.mkdir()
    resolver = ModelResolver(configs, model_dir=model_dir)
    with pytest.raises(ConfigError) as error:
        resolver.resolve("acme/llm@v9", FIELD)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{FIELD}: acme/llm (revision v9) is not on this machine; searched ")
    for place in (configs / "acme" / "llm", model_dir / "acme" / "llm", model_dir / "llm",
                  model_dir / "models--acme--llm", cache / "models--acme--llm"):
        assert str(place) in message, place
    assert message.endswith("Pass --model-dir DIR, or download it first "
                            "(`hf download acme/llm --revision v9`, or `huggingface-cli download` with older "
                            "huggingface_hub); mergeplan never downloads")
    # a cached repo without that ref names the ref file; a short commit hash gets the full-hash hint
    with pytest.raises(ConfigError) as error:
        resolver.resolve("org/model@v9", FIELD)
    assert f"{cache / 'models--org--model' / 'refs' / 'v9'} (no such ref)" in str(error.value)
    with pytest.raises(ConfigError, match=r"revision 4a5b6c7 \(a commit revision must be the full 40-character"):
        resolver.resolve("org/model@4a5b6c7", FIELD)
    missing = "0" * 40
    with pytest.raises(ConfigError) as error:
        resolver.resolve(f"org/model@{missing}", FIELD)
    assert str(cache / "models--org--model" / "snapshots" / missing) in str(error.value)
    with pytest.raises(ConfigError, match=rf"^{re.escape(FIELD)} \(its LoRA\): org/nope \(revision main\) is not on"):
        resolver.resolve("org/model+org/nope", FIELD)


@pytest.mark.parametrize(("reference", "message"), [
    ("a+b+c", "'a+b+c' has more than one +; write MODEL or MODEL+LORA"),
    ("org/m@a@b", "'org/m@a@b' has more than one @"),
    ("org/m@", "'org/m@' has an empty revision after @"),
    ("./not-here", "./not-here: no such folder ("),
    ("org/m@../../x", "revision '../../x' is not a branch, tag or commit hash"),
    ({"lora": "x"}, "expected MODEL, MODEL+LORA or {model: ..., lora: ...}"),
    ({"model": 3}, ".model: 3; expected a folder or hub id"),
])
def test_malformed_references_name_their_field(tmp_path, cache, reference, message):
    with pytest.raises(ConfigError) as error:
        ModelResolver(tmp_path).resolve(reference, FIELD)
    assert str(error.value).startswith(FIELD) and message in str(error.value)


def test_a_checkpoint_in_the_hub_cache_reads_through_its_blob_links_and_other_links_stay_refused(tmp_path, cache):
    config = llama_config(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=32, dtype="float32")
    made = write_random_base(tmp_path / "made", config, seed=0)
    repo = cache / "models--acme--tiny"
    snapshot = repo / "snapshots" / C_MAIN
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in made.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(C_MAIN)
    resolved = ModelResolver(tmp_path).resolve("acme/tiny", FIELD)
    assert resolved.path == snapshot and resolved.name == "tiny"
    reader, original = CheckpointReader(resolved.path), CheckpointReader(made)
    assert reader.names() == original.names()
    for name in reader.names():
        assert torch.equal(reader.read(name), original.read(name)), name
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(made / "model.safetensors")  # out of the repo's blobs
    with pytest.raises(CheckpointError, match="a link to .* outside"):
        CheckpointReader(snapshot)


def test_merge_cli_passes_model_dir(tmp_path, monkeypatch, run_cli):
    import merging
    import merging.lora_export

    calls = {}
    monkeypatch.setattr(merging, "merge", lambda *args, **kwargs: calls.setdefault("merge", kwargs) and "out")
    monkeypatch.setattr(merging.lora_export, "merge_as_lora",
                        lambda *args, **kwargs: calls.setdefault("lora", kwargs) and {
                            "rank": 2, "tensors": 1, "relative_error": 0.0, "worst_tensor": "t",
                            "worst_relative_error": 0.0})
    status, _, err = run_cli("merge", tmp_path / "m.yaml", tmp_path / "out", "--model-dir", tmp_path / "models")
    assert status == 0, err
    assert calls["merge"]["model_dir"] == tmp_path / "models"
    status, _, err = run_cli("merge", tmp_path / "m.yaml", tmp_path / "out", "--model-dir", "dir", "--lora-rank", 2)
    assert status == 0, err
    assert calls["lora"]["model_dir"] == Path("dir")
