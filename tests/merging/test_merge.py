"""End-to-end merges of real (tiny, sharded) safetensors checkpoints through the API and the CLI."""

import json
import subprocess
import sys

import pytest
import reference
import torch
import yaml

from merging import CheckpointError, ExpertRef, MergeConfig, add_experts, merge
from merging.io.checkpoint import CheckpointReader
from merging.methods.registry import REGISTRY

METHOD_PARAMS = {
    "average": {},
    "task_arithmetic": {"lambda": 0.8, "normalize": True},
    "ties": {"density": 0.3, "lambda": 1.1},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.4},
    "breadcrumbs": {"density": 0.5, "gamma": 0.05, "lambda": 0.9},
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.05},
    "della": {"density": 0.5, "epsilon": 0.2},
    "della_linear": {"density": 0.6, "epsilon": 0.1, "lambda": 0.8},
    "model_stock": {"filter_wise": True},
}


def weights_for(method, weights):
    """Model Stock has no per-expert weight: every expert counts once."""
    return [1.0] * len(weights) if method == "model_stock" else weights


def expected_tensor(method, params, base, experts, weights, name, seed):
    scale = params.get("lambda", 1.0)
    if method == "average":
        return reference.average(base, experts, weights)
    if method == "task_arithmetic":
        return reference.linear(base, experts, weights, scale, params.get("normalize", False))
    if method == "ties":
        return reference.ties(base, experts, weights, params["density"], scale)
    if method == "model_stock":
        return reference.model_stock(base, experts, params["filter_wise"])
    if method.startswith("breadcrumbs"):
        extra = {"normalize": params.get("normalize", False)} if method == "breadcrumbs" else {}
        return getattr(reference, method)(base, experts, weights, params["density"], params["gamma"], scale, **extra)
    if method.startswith("della"):
        return getattr(reference, method)(base, experts, weights, params["density"], params["epsilon"], seed, name,
                                          scale)
    return getattr(reference, method)(base, experts, weights, params["density"], seed, name, scale)


def read_all(folder):
    reader = CheckpointReader(folder)
    return {name: reader.read(name) for name in reader.names()}


@pytest.mark.parametrize("method", list(METHOD_PARAMS))
def test_merge_matches_spec_on_every_tensor(zoo, tmp_path, method):
    weights = weights_for(method, [1.0, 0.5, 2.0])
    experts = [ExpertRef(path=p, weight=w) for p, w in zip(zoo["experts"], weights, strict=False)]
    config = MergeConfig(base=zoo["base"], experts=experts, method=method, params=METHOD_PARAMS[method],
                         dtype="float32", seed=5)
    merged = read_all(merge(config, tmp_path / "out"))
    base = read_all(zoo["base"])
    expert_tensors = [read_all(p) for p in zoo["experts"][:3]]
    assert list(merged) == list(base)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32
        expected = expected_tensor(method, METHOD_PARAMS[method], base[name].float(),
                                   [e[name].float() for e in expert_tensors], weights, name, seed=5)
        torch.testing.assert_close(tensor, expected, rtol=0, atol=2e-6, msg=name)


def test_output_is_a_checkpoint_transformers_loads(zoo, tmp_path, copy_model):
    from transformers import AutoModelForCausalLM

    base = copy_model(zoo["base"], "base")
    (base / "tokenizer.json").write_text("{}")  # companion files travel with the merged model
    config = MergeConfig(base=base, experts=zoo["experts"], method="ties", params={"density": 0.2},
                         max_shard_size="30KB")
    out = merge(config, tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).stat().st_size <= 30_000 + 4096 for s in shards)
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in CheckpointReader(out).tensors.values())
    assert (out / "tokenizer.json").read_text() == "{}"
    assert yaml.safe_load((out / "merge_config.yaml").read_text())["method"] == "ties"
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    merged = read_all(out)
    for name, parameter in model.state_dict().items():
        assert torch.equal(parameter, merged[name]), name


def test_include_patterns_copy_the_rest_from_the_base(zoo, tmp_path):
    config = MergeConfig(base=zoo["base"], experts=zoo["experts"], method="average",
                         include=["*.mlp.*"])
    merged, base = read_all(merge(config, tmp_path / "out")), read_all(zoo["base"])
    mlp = [n for n in base if ".mlp." in n]
    assert mlp and all(not torch.equal(merged[n], base[n]) for n in mlp)
    assert all(torch.equal(merged[n], base[n]) for n in base if n not in mlp)


def test_output_dtype_and_config(zoo, tmp_path):
    config = MergeConfig(base=zoo["base"], experts=zoo["experts"], method="average", dtype="float16")
    out = merge(config, tmp_path / "out")
    assert {t.dtype for t in read_all(out).values()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_output_has_a_model_card_with_the_recipe_and_no_local_paths(zoo, tmp_path):
    experts = [ExpertRef(path=zoo["experts"][0]), ExpertRef(path=zoo["experts"][1], weight=0.5, name="code")]
    config = MergeConfig(base=zoo["base"], experts=experts, method="ties", params={"density": 0.3}, seed=7)
    card = (merge(config, tmp_path / "out") / "README.md").read_text()
    front, body = card.removeprefix("---\n").split("\n---\n", 1)
    assert yaml.safe_load(front) == {"base_model": "base", "library_name": "transformers",
                                     "tags": ["mergeplan", "merge", "ties"]}
    assert "- `expert0`, weight 1\n- `expert1` as code, weight 0.5" in body
    recipe = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert recipe["params"] == {"density": 0.3} and recipe["seed"] == 7 and recipe["base"] == "base"
    assert [e["path"] for e in recipe["experts"]] == ["expert0", "expert1"]
    assert str(zoo["base"].parent) not in card  # folder names only: the card travels with the model


@pytest.mark.parametrize("method", ["dare_ties", "ties"])
def test_same_inputs_and_seed_give_bit_identical_files(zoo, tmp_path, method):
    config = MergeConfig(base=zoo["base"], experts=zoo["experts"], method=method, params={"density": 0.5},
                         seed=3)
    first, second = merge(config, tmp_path / "a"), merge(config, tmp_path / "b")
    shards = sorted(p.name for p in first.glob("*.safetensors"))
    assert shards and all((first / s).read_bytes() == (second / s).read_bytes() for s in shards)
    other_seed = merge(config.model_copy(update={"seed": 4}), tmp_path / "c")
    same = all((first / s).read_bytes() == (other_seed / s).read_bytes() for s in shards)
    assert same == (method == "ties")  # only DARE is random


@pytest.mark.parametrize("method", list(METHOD_PARAMS))
def test_incremental_merge_equals_batch_merge(zoo, tmp_path, method):
    weights = weights_for(method, [1.0, 0.5, 2.0, 1.5])
    refs = [ExpertRef(path=p, weight=w) for p, w in zip(zoo["experts"], weights, strict=True)]
    config = MergeConfig(base=zoo["base"], experts=refs, method=method, params=METHOD_PARAMS[method],
                         dtype="float32")
    batch = read_all(merge(config, tmp_path / "batch"))
    head = config.model_copy(update={"experts": refs[:2]})
    merge(head, tmp_path / "two", save_state=tmp_path / "state")
    add_experts(tmp_path / "state", [refs[2]], tmp_path / "three")
    incremental = read_all(add_experts(tmp_path / "state", [refs[3]], tmp_path / "four"))
    for name, tensor in batch.items():
        assert torch.equal(tensor, incremental[name]), name  # the same fold: bit-identical
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert [e["weight"] for e in state["config"]["experts"]] == weights
    assert not list(tmp_path.glob(".*"))  # no partial folders left behind


def test_incremental_merge_can_keep_the_previous_state(zoo, tmp_path):
    config = MergeConfig(base=zoo["base"], experts=zoo["experts"][:3], method="ties", params={"density": 0.5},
                         dtype="float32")
    batch = read_all(merge(config, tmp_path / "batch"))
    head = MergeConfig(base=zoo["base"], experts=zoo["experts"][:2], method="ties", params={"density": 0.5},
                       dtype="float32")
    merge(head, tmp_path / "two", save_state=tmp_path / "s2")
    before = {p.name: p.read_bytes() for p in (tmp_path / "s2").iterdir()}
    incremental = read_all(add_experts(tmp_path / "s2", [zoo["experts"][2]], tmp_path / "three",
                                       state_out=tmp_path / "s3"))
    assert all(torch.equal(tensor, incremental[name]) for name, tensor in batch.items())
    assert {p.name: p.read_bytes() for p in (tmp_path / "s2").iterdir()} == before
    state = json.loads((tmp_path / "s3" / "state.json").read_text())
    assert len(state["config"]["experts"]) == 3


def test_add_expert_refuses_a_changed_base(zoo, tmp_path, copy_model):
    base = copy_model(zoo["base"], "base")
    config = MergeConfig(base=base, experts=zoo["experts"][:2], method="task_arithmetic")
    merge(config, tmp_path / "two", save_state=tmp_path / "state")
    config_path = base / "config.json"
    changed = json.loads(config_path.read_text()) | {"rope_theta": 5.0}
    config_path.write_text(json.dumps(changed))
    with pytest.raises(CheckpointError, match="rope_theta is None, the base .* has 5.0"):
        add_experts(tmp_path / "state", [zoo["experts"][2]], tmp_path / "three")
    assert not (tmp_path / "three").exists()


def test_cli_merge_and_add_expert(zoo, tmp_path, write_config, run_cli):
    config = write_config(base=zoo["base"], experts=zoo["experts"][:3], method="ties",
                          params={"density": 0.5}, dtype="float32")
    status, out, err = run_cli("merge", config, tmp_path / "three", "--save-state", tmp_path / "state")
    assert status == 0 and out.strip() == str(tmp_path / "three"), err
    status, out, err = run_cli("add-expert", tmp_path / "state", zoo["experts"][3], "-o", tmp_path / "four")
    assert status == 0, err
    full = write_config(base=zoo["base"], experts=zoo["experts"], method="ties", params={"density": 0.5},
                        dtype="float32")
    assert run_cli("merge", full, tmp_path / "all")[0] == 0
    incremental, batch = read_all(tmp_path / "four"), read_all(tmp_path / "all")
    assert all(torch.equal(incremental[n], batch[n]) for n in batch)


def test_relative_paths_are_taken_from_the_config_folder(zoo, tmp_path, run_cli):
    (tmp_path / "cfg").mkdir()
    config = tmp_path / "cfg" / "merge.yaml"
    config.write_text(yaml.safe_dump({"base": "../zoo/base", "experts": ["../zoo/e0"], "method": "average"}))
    (tmp_path / "zoo").mkdir()
    (tmp_path / "zoo" / "base").symlink_to(zoo["base"])
    (tmp_path / "zoo" / "e0").symlink_to(zoo["experts"][0])
    status, _, err = run_cli("merge", config, tmp_path / "out")
    assert status == 0, err
    assert read_all(tmp_path / "out").keys() == read_all(zoo["base"]).keys()


def test_console_script_version_and_help():
    version = subprocess.run([sys.executable, "-m", "mergeplan.cli", "--version"], capture_output=True,
                             text=True, check=True)
    assert version.stdout.strip() == "mergeplan 0.1.0"
    helptext = subprocess.run([sys.executable, "-m", "mergeplan.cli", "merge", "--help"], capture_output=True,
                              text=True, check=True).stdout
    assert "--save-state" in helptext
    assert all(f"  {method.name:<19}{method.summary}" in helptext for method in REGISTRY)


def test_output_folder_from_the_config(zoo, tmp_path, write_config, run_cli):
    config = write_config(base=zoo["base"], experts=zoo["experts"][:2], method="average", out="merged")
    status, out, err = run_cli("merge", config)
    assert status == 0 and (tmp_path / "merged" / "model.safetensors").exists(), err
    assert merge(MergeConfig(base=zoo["base"], experts=zoo["experts"][:2], method="average",
                             out=tmp_path / "api")) == tmp_path / "api"
    no_out = write_config(base=zoo["base"], experts=zoo["experts"][:2], method="average")
    status, _, err = run_cli("merge", no_out)
    assert status == 2 and "out: no output folder" in err
