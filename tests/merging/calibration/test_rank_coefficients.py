"""params.coefficients: rank — one α per rank-1 component of each LoRA adapter: equal to the tensor family where
the components share their tensor's α, the checkpoint is the definition computed from the factors, apply and
lora_out reproduce it, calibration lowers its objective, the default is unchanged, bad input is one line."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from merging import ExpertRef, MergeConfig, merge
from merging.calibration.adapter_output import merged_tensor
from merging.calibration.coefficients import Coefficients
from merging.calibration.components import per_component, pull_weights, ranks_of
from merging.calibration.expert_merging import MergedModel, TrainableCoefficients
from merging.calibration.sources import load_sources
from merging.experts import LoraAdapter, open_expert
from merging.io.checkpoint import CheckpointReader
from merging.io.hf_loading import load_causal_lm
from merging.io.safetensors_file import read_tensor
from merging.io.synthetic import write_random_lora
from merging.merger import apply_coefficients

DOMAINS = ["algebra", "code", "biology"]
FAST = {"samples_per_expert": 3, "grad_accumulation": 3, "epochs": 2, "init": 0.3, "gamma": 0.8}
RANK = FAST | {"coefficients": "rank"}
TARGETS = [("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
           ("q_proj", "v_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")]


@pytest.fixture(scope="module")
def adapters(tiny_zoo, tmp_path_factory) -> dict[str, Path]:
    """Three LoRA experts of the tiny base: ranks 2, 4, 3 (one rsLoRA, two leave some modules alone)."""
    root = tmp_path_factory.mktemp("rank_adapters")
    return {domain: write_random_lora(tiny_zoo / "base", root / domain, seed=7 + i, rank=(2, 4, 3)[i],
                                      targets=TARGETS[i], scale=40.0, use_rslora=i == 1)
            for i, domain in enumerate(DOMAINS)}


def config(tiny_zoo: Path, experts: dict[str, Path], method: str = "expert_merging", **params) -> MergeConfig:
    return MergeConfig(base=tiny_zoo / "base", method=method, seed=5,
                       experts=[ExpertRef(path=path, name=name) for name, path in experts.items()],
                       calibration={d: tiny_zoo / "data" / d / "calib.jsonl" for d in experts}, params=params)


def outputs(folder: Path) -> tuple[Coefficients, dict, dict]:
    """(coefficients, coefficients.json, calibration.json) of a calibrated output folder."""
    return (Coefficients.load(folder / "coefficients.json"), json.loads((folder / "coefficients.json").read_text()),
            json.loads((folder / "calibration.json").read_text()))


def by_hand(base: CheckpointReader, coefficients: Coefficients, name: str) -> torch.Tensor:
    """W0 + Σk B_k·diag(α_k·s_k)·A_k from the adapters' files, float32, experts summed in order."""
    total = torch.zeros(base.tensors[name].shape)
    for ref, alpha in zip(coefficients.config.experts, coefficients.expert_alpha(name), strict=True):
        factors = LoraAdapter(ref.path).changes.get(name)
        if factors is not None and factors.factors is not None:
            lora = factors.factors
            a, b = read_tensor(lora.a).float(), read_tensor(lora.b).float()
            total += torch.mm(b.float() * (alpha.float() * lora.scale)[None, :], a.float())
    return base.read(name).float() + total


def test_components_at_their_tensors_alpha_are_the_tensor_family(tiny_zoo, adapters, tmp_path):
    base = CheckpointReader(tiny_zoo / "base")
    experts = [open_expert(p) for p in adapters.values()]
    names = [n for n in base.names() if ".layers." in n and n.endswith("proj.weight")]
    network = load_causal_lm(tiny_zoo / "base").eval().requires_grad_(False)
    layout = load_sources(base, experts, names, network, factored=True, streamed=False,
                          device=torch.device("cpu"), dtype=torch.float32)
    model = MergedModel(network, layout.sources, len(experts))
    of = {n: s.low_rank.experts for n, s in layout.sources.items()}
    assert set(of) == set(names)
    generator = torch.Generator().manual_seed(0)
    tensor = {n: torch.rand(len(experts), 1, generator=generator) for n in names}
    for name, alpha in tensor.items():  # an expert without components sits at ᾱ, where its pull is zero
        alpha[torch.bincount(of[name], minlength=len(experts)) == 0] = 0.3
    component = {n: per_component(tensor[n], of[n]) for n in names}
    ids = torch.randint(3, 200, (1, 16), generator=generator)
    with torch.no_grad():
        expected = model(model.merged(tensor), ids, hidden=False).logits
        got = model(model.merged(component), ids, hidden=False).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the pull counts an expert's components on a tensor as one coefficient: the same regulariser
    logit = {n: torch.logit(a) for n, a in tensor.items()}
    per_tensor = TrainableCoefficients(logit, {})
    per_rank = TrainableCoefficients({n: per_component(r, of[n]) for n, r in logit.items()}, {}, "sigmoid",
                                     {n: pull_weights(e) for n, e in of.items()})
    assert per_rank.per_expert() == per_tensor.per_expert() == len(names)
    torch.testing.assert_close(per_rank.regulariser(per_rank.alpha(), 0.3),
                               per_tensor.regulariser(per_tensor.alpha(), 0.3))
    # and the checkpoints of both families agree
    merge_config = config(tiny_zoo, adapters)
    ranks = {n: ranks_of(of[n], len(experts)) for n in names}
    dense = apply_coefficients(Coefficients(merge_config, DOMAINS, tensor), tmp_path / "tensor")
    split = apply_coefficients(Coefficients(merge_config, DOMAINS, component, ranks=ranks), tmp_path / "rank")
    for name in names:
        torch.testing.assert_close(CheckpointReader(split).read(name), CheckpointReader(dense).read(name),
                                   atol=1e-6, rtol=0)
    # lora_out's dense value of a module saved whole (a calibrated lora_B bias beside the weight)
    torch.testing.assert_close(merged_tensor(component[names[0]], experts, names[0], base, ranks[names[0]]),
                               merged_tensor(tensor[names[0]], experts, names[0], base), atol=1e-6, rtol=0)


def test_rank_merge_is_the_definition_apply_reproduces_it_and_reruns_are_identical(tiny_zoo, adapters, tmp_path,
                                                                                 caplog):
    with caplog.at_level(logging.INFO, logger="mergeplan"):
        merge(config(tiny_zoo, adapters, **RANK), tmp_path / "a")
    assert any("14 tensors are LoRA factors only and take one α per component" in r.message for r in caplog.records)
    coefficients, data, report = outputs(tmp_path / "a")
    assert data["format"] == 3
    entry = data["tensors"]["model.layers.0.mlp.down_proj.weight"]
    assert entry["components"] == {"algebra": 2, "code": 4, "biology": 0}
    assert [len(entry["alpha"][d]) for d in DOMAINS] == [2, 4, 0] and "chunks" not in entry
    components = sum(sum(e["components"].values()) for e in data["tensors"].values())
    assert report["coefficients"] == {"family": "rank", "rank_eligible_tensors": 14, "per_component_tensors": 14,
                                      "components": components, "total": components}
    assert report["stages"][0]["trained_per_expert"] == 14 and report["stages"][0]["trained_coefficients"] == components
    moved = torch.cat([(a - 0.3).abs() for a in coefficients.alpha.values()])
    assert moved.max() > 1e-2
    assert (tmp_path / "a" / "coefficients.png").is_file()
    base, merged = CheckpointReader(tiny_zoo / "base"), CheckpointReader(tmp_path / "a")
    for name in base.names():
        expected = by_hand(base, coefficients, name) if name in coefficients.alpha else base.read(name)
        assert torch.equal(merged.read(name), expected), name
    apply_coefficients(tmp_path / "a" / "coefficients.json", tmp_path / "applied")
    assert (tmp_path / "applied" / "model.safetensors").read_bytes() == \
        (tmp_path / "a" / "model.safetensors").read_bytes()
    merge(config(tiny_zoo, adapters, **RANK), tmp_path / "b")
    assert (tmp_path / "a" / "coefficients.json").read_bytes() == (tmp_path / "b" / "coefficients.json").read_bytes()


def test_the_tensor_default_is_unchanged(tiny_zoo, adapters, tmp_path):
    fast = FAST | {"epochs": 1}
    merge(config(tiny_zoo, adapters, "expert_merging_pp", **fast), tmp_path / "absent")
    merge(config(tiny_zoo, adapters, "expert_merging_pp", **fast, coefficients="tensor"), tmp_path / "tensor")
    (absent, data, report), (tensor, _, _) = outputs(tmp_path / "absent"), outputs(tmp_path / "tensor")
    assert data["format"] == 2 and not absent.ranks  # older readers still apply it
    assert report["coefficients"]["family"] == "tensor" and report["coefficients"]["per_component_tensors"] == 0
    assert absent.alpha.keys() == tensor.alpha.keys()
    for name, alpha in absent.alpha.items():
        assert torch.equal(alpha, tensor.alpha[name]), name
    assert (tmp_path / "absent" / "model.safetensors").read_bytes() == \
        (tmp_path / "tensor" / "model.safetensors").read_bytes()


def test_calibration_lowers_its_objective(tiny_zoo, adapters, tmp_path):
    merge(config(tiny_zoo, adapters, **RANK | {"gamma": 0.0, "lr": 0.1, "epochs": 6}), tmp_path / "m")
    steps = outputs(tmp_path / "m")[2]["stages"][0]["steps"]
    first = [s["loss"] for s in steps if s["epoch"] == 1]
    last = [s["loss"] for s in steps if s["epoch"] == 6]
    assert sum(last) / len(last) < 0.97 * sum(first) / len(first)


def test_em_pp_refines_the_allocated_tensors_per_component_and_gamma_auto_works(tiny_zoo, adapters, tmp_path):
    params = RANK | {"budget": 3.0, "kappa": 2.0, "gamma": "auto", "gamma_grid": [0.0, 0.8]}
    merge(config(tiny_zoo, adapters, "expert_merging_pp", **params), tmp_path / "m")
    coefficients, data, report = outputs(tmp_path / "m")
    assert [s["name"] for s in report["stages"]] == ["expert_merging", "expert_merging_pp"]
    assert report["stages"][0]["trained_coefficients"] == 14 * 3  # stage 1: per tensor
    assert report["gamma_choice"]["chosen"] in (0.0, 0.8)
    picked = {n for n, m in report["chunks"].items() if m > 0}
    assert 0 < len(picked) < 14
    for name, entry in data["tensors"].items():
        assert ("components" in entry) == (name in picked) and entry["trained"] == (name in picked)
        if name not in picked:
            assert entry["chunks"] == 1
    assert report["coefficients"]["per_component_tensors"] == len(picked)
    apply_coefficients(tmp_path / "m" / "coefficients.json", tmp_path / "applied")
    assert (tmp_path / "applied" / "model.safetensors").read_bytes() == \
        (tmp_path / "m" / "model.safetensors").read_bytes()


def test_a_full_checkpoint_keeps_per_tensor_coefficients_where_it_touches(tiny_zoo, adapters, tmp_path, caplog):
    experts = {"algebra": adapters["algebra"], "code": tiny_zoo / "experts" / "code", "biology": adapters["biology"]}
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        merge(config(tiny_zoo, experts, **RANK), tmp_path / "m")
    assert any("0 tensors are LoRA factors only" in r.message for r in caplog.records)  # the checkpoint is everywhere
    coefficients, data, report = outputs(tmp_path / "m")
    assert data["format"] == 2 and report["coefficients"]["rank_eligible_tensors"] == 0


def test_lora_out_writes_scaled_columns_of_b_and_loads_to_the_dense_merge(tiny_zoo, adapters, tmp_path):
    from peft import PeftModel

    merge(config(tiny_zoo, adapters, **RANK | {"lora_out": True}), tmp_path / "adapter")
    coefficients = Coefficients.load(tmp_path / "adapter" / "coefficients.json")
    dense = apply_coefficients(tmp_path / "adapter" / "coefficients.json", tmp_path / "dense")
    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    base, merged = CheckpointReader(tiny_zoo / "base"), CheckpointReader(dense)
    for name in coefficients.ranks:
        module = "base_model.model." + name.removesuffix(".weight")
        update = factors[module + ".lora_B.weight"] @ factors[module + ".lora_A.weight"]
        torch.testing.assert_close(update, merged.read(name) - base.read(name), atol=1e-6, rtol=0)
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model = load_causal_lm(tiny_zoo / "base").eval()
        base_logits = model(ids).logits
        adapted = PeftModel.from_pretrained(model, tmp_path / "adapter").eval()(ids).logits
        dense_logits = load_causal_lm(dense).eval()(ids).logits
    assert (dense_logits - base_logits).abs().max() > 0.05
    torch.testing.assert_close(adapted, dense_logits, atol=1e-5, rtol=0)


def test_warm_start_from_per_tensor_coefficients_starts_each_component_at_its_tensors_alpha(tiny_zoo, adapters,
                                                                                           tmp_path, run_cli,
                                                                                           write_config):
    head = {d: adapters[d] for d in DOMAINS[:2]}
    merge(config(tiny_zoo, head, **FAST), tmp_path / "head")
    earlier = Coefficients.load(tmp_path / "head" / "coefficients.json")
    # a learning rate too small to move anything: what comes out is where training started
    warm = RANK | {"lr": 1e-9, "warm_start": str(tmp_path / "head" / "coefficients.json")}
    merge(config(tiny_zoo, adapters, **warm), tmp_path / "warm")
    started, _, report = outputs(tmp_path / "warm")
    assert report["warm_start"]["new_experts"] == ["biology"]
    for name in started.ranks:
        parts = started.expert_alpha(name)
        for k in range(2):
            assert torch.allclose(parts[k], earlier.alpha[name][k, 0].expand_as(parts[k]), atol=1e-5), name
        assert torch.allclose(parts[2], torch.full_like(parts[2], 0.3), atol=1e-5)
    # per-component coefficients go on into a rank run (the new expert's at init), not into a tensor run
    again = RANK | {"lr": 1e-9, "warm_start": str(tmp_path / "warm" / "coefficients.json")}
    merge(config(tiny_zoo, adapters, **again), tmp_path / "again")
    for name, alpha in started.alpha.items():
        torch.testing.assert_close(Coefficients.load(tmp_path / "again" / "coefficients.json").alpha[name], alpha,
                                   atol=1e-5, rtol=0)
    tensor_run = write_config(base=tiny_zoo / "base", experts=list(adapters.values()), method="expert_merging",
                              calibration={d: str(tiny_zoo / "data" / d / "calib.jsonl") for d in DOMAINS},
                              params=FAST | {"warm_start": str(tmp_path / "warm" / "coefficients.json")})
    status, _, err = run_cli("merge", tensor_run, tmp_path / "refused")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "params.warm_start:" in err and "set params.coefficients: rank" in err
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize(("params", "message"), [
    ({"coefficients": "layer"}, "params.coefficients"),
    ({"coefficients": "rank", "mode": "blockwise"}, "params.coefficients: rank weighs each LoRA component"),
    ({"coefficients": "rank", "task_vectors": "resident"}, "which task_vectors: resident does not keep"),
])
def test_bad_params_are_one_line(tiny_zoo, adapters, tmp_path, run_cli, write_config, params, message):
    path = write_config(base=tiny_zoo / "base", experts=list(adapters.values()), method="expert_merging",
                        calibration={d: str(tiny_zoo / "data" / d / "calib.jsonl") for d in DOMAINS},
                        params=FAST | params)
    status, _, err = run_cli("merge", path, tmp_path / "out")
    assert status == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_adamerging_has_no_rank_family(tiny_zoo, adapters, tmp_path, run_cli, write_config):
    path = write_config(base=tiny_zoo / "base", experts=list(adapters.values()), method="adamerging",
                        calibration={d: str(tiny_zoo / "data" / d / "calib.jsonl") for d in DOMAINS},
                        params={"coefficients": "rank"})
    status, _, err = run_cli("merge", path, tmp_path / "out")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "params.coefficients" in err, err


@pytest.fixture(scope="module")
def rank_file(tiny_zoo, adapters, tmp_path_factory) -> dict:
    """A per-component coefficients.json, as data, learned with one epoch."""
    folder = tmp_path_factory.mktemp("rank_file") / "m"
    merge(config(tiny_zoo, adapters, **RANK | {"epochs": 1}), folder)
    return json.loads((folder / "coefficients.json").read_text())


def edit(data: dict, tensor: str | None = None, **fields) -> dict:
    copy = json.loads(json.dumps(data))
    if tensor is None:
        return copy | fields
    copy["tensors"][tensor] |= fields
    return copy


DOWN = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: edit(d, format=4), "coefficients format 4 is newer than this mergeplan reads (formats 1-3)"),
    (lambda d: edit(d, format=2), f"tensors.{DOWN}: per-component coefficients need format 3, the file says 2"),
    (lambda d: edit(d, DOWN, alpha=d["tensors"][DOWN]["alpha"] | {"code": [0.3]}),
     f"tensors.{DOWN}.alpha.code: expected 4 component coefficients"),
    (lambda d: edit(d, DOWN, components={"algebra": 2, "code": 1, "biology": 0},
                    alpha=d["tensors"][DOWN]["alpha"] | {"code": [0.3]}),
     f"tensors.{DOWN}.alpha.code: 1 component coefficients, but the adapter"),
    (lambda d: edit(d, DOWN, components={"algebra": 2, "code": 4, "biology": 1},
                    alpha=d["tensors"][DOWN]["alpha"] | {"biology": [0.3]}),
     f"tensors.{DOWN}.alpha.biology: 1 component coefficients, but the adapter"),
])
def test_a_file_apply_cannot_use_is_one_line(rank_file, tmp_path, run_cli, change, message):
    path = tmp_path / "coefficients.json"
    path.write_text(json.dumps(change(rank_file)))
    status, _, err = run_cli("apply", path, "-o", tmp_path / "out")
    assert status == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_full_checkpoint_in_place_of_an_adapter_is_refused_by_apply(rank_file, tiny_zoo, tmp_path, run_cli):
    data = json.loads(json.dumps(rank_file))
    data["config"]["experts"][1]["path"] = str(tiny_zoo / "experts" / "code")
    path = tmp_path / "coefficients.json"
    path.write_text(json.dumps(data))
    status, _, err = run_cli("apply", path, "-o", tmp_path / "out")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "per-component coefficients apply to LoRA factors only" in err and "full checkpoint" in err
