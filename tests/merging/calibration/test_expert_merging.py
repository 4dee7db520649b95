"""Expert Merging / EM++: chunk arithmetic, allocation, sampler, end-to-end calibration on the tiny zoo, bad input."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from merging.calibration.coefficients import Coefficients
from merging.calibration.importance import allocate_chunks, importance
from merging.calibration.samples import Sample, balanced_order
from merging.data.example import Example, write_jsonl
from merging.errors import ConfigError
from merging.experts import open_expert
from merging.io.checkpoint import CheckpointReader
from merging.io.safetensors_file import read_header
from merging.methods.learned import LearnedCoefficients, chunk_sizes, combine, row_coefficients, row_length

DOMAINS = ["algebra", "code", "biology"]
FAST = {"samples_per_expert": 3, "grad_accumulation": 3, "epochs": 2, "gamma": 0.8}  # γ fixed: auto is tested apart


def naive_combine(task_vectors: torch.Tensor, alpha: torch.Tensor, row: int) -> torch.Tensor:
    pieces, start = [], 0
    for s, size in enumerate(chunk_sizes(task_vectors.shape[1] // row, alpha.shape[1])):
        end = start + size * row
        pieces.append(sum(alpha[k, s] * task_vectors[k, start:end] for k in range(len(alpha))))
        start = end
    return torch.cat(pieces)


@pytest.mark.parametrize(("shape", "chunks"), [((10,), 1), ((10,), 4), ((6,), 4), ((7, 3), 7), ((12, 5), 3),
                                               ((100, 10), 7), ((6, 2, 3), 4)])
def test_chunks_are_whole_row_blocks_never_dropped_and_combine_matches_the_definition(shape, chunks):
    rows, row = shape[0], row_length(shape)
    sizes = chunk_sizes(rows, chunks)
    assert len(sizes) == chunks and sum(sizes) == rows and max(sizes) - min(sizes) <= 1
    generator = torch.Generator().manual_seed(rows + chunks)
    task_vectors = torch.randn(3, rows * row, generator=generator, dtype=torch.float64)
    alpha = torch.rand(3, chunks, generator=generator, dtype=torch.float64)
    expected = naive_combine(task_vectors, alpha, row)
    assert torch.allclose(combine(task_vectors, alpha, row), expected)
    per_row = row_coefficients(alpha, rows)  # (K, rows): what scales the rows of a LoRA expert's B
    by_rows = (per_row[:, :, None] * task_vectors.view(3, rows, row)).sum(dim=0).reshape(-1)
    assert torch.allclose(by_rows, expected)
    method = LearnedCoefficients({"w": alpha})
    state = {"sum": torch.zeros(shape, dtype=torch.float64)}
    for k in range(3):
        vector = task_vectors[k].clone().view(shape)
        method.add(state, method.sparsify(vector, "w", k), weight=7.0)  # weights do not rescale
    assert torch.allclose(method.delta(state, 21.0, torch.zeros(shape)).reshape(-1), expected)


def test_torch_chunk_would_drop_one_and_a_block_is_never_less_than_a_row():
    assert len(torch.arange(6).chunk(4)) == 3  # why chunk_sizes exists
    assert chunk_sizes(6, 4) == [2, 2, 1, 1]
    with pytest.raises(ValueError, match="cannot cut 3 rows into 4 blocks"):
        chunk_sizes(3, 4)


def test_importance_and_allocation_by_hand():
    alpha = {"a": torch.tensor([[0.5], [0.5]]), "b": torch.tensor([[0.2], [0.2]]), "c": torch.tensor([[0.1], [0.3]])}
    l1 = {"a": torch.tensor([4.0, 4.0]), "b": torch.tensor([1.0, 1.0]), "c": torch.tensor([1.0, 1.0])}
    scores = importance(alpha, l1)  # raw 4.0, 0.4, 0.4
    assert scores == pytest.approx({"a": 4 / 4.8, "b": 0.4 / 4.8, "c": 0.4 / 4.8})
    # B·L = 3: floor(3·0.833) = 2, floor(3·0.083) = 0
    assert allocate_chunks(scores, {"a": 100, "b": 100, "c": 100}, budget=1.0, kappa=1.0) == {"a": 2, "b": 0, "c": 0}
    # kappa 0 spreads evenly; the count is capped by the rows a tensor has (chunks are whole row blocks)
    assert allocate_chunks(scores, {"a": 100, "b": 100, "c": 1}, budget=2.0, kappa=0.0) == {"a": 2, "b": 2, "c": 1}
    # kappa 2 concentrates on the most important tensor
    assert allocate_chunks(scores, {"a": 100, "b": 100, "c": 100}, budget=2.0, kappa=2.0) == {"a": 5, "b": 0, "c": 0}


def test_a_budget_finer_than_a_tensors_rows_is_capped_at_whole_rows_with_a_warning(caplog):
    scores = {"a": 0.9, "b": 0.1}
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        chunks = allocate_chunks(scores, {"a": 3, "b": 100}, budget=5.0, kappa=1.0)  # asks a for floor(10·0.9) = 9
    assert chunks == {"a": 3, "b": 1}
    assert "asks 9 chunks of a, which has 3 rows" in caplog.text and "blocks of whole rows" in caplog.text


def test_balanced_order_round_robins_and_cycles_smaller_groups():
    samples = [Sample(0, torch.tensor([[i]])) for i in range(3)] + [Sample(1, torch.tensor([[10]]))]
    order = balanced_order(samples, seed=0, epoch=0)
    assert [s.expert for s in order] == [0, 1, 0, 1, 0, 1]
    assert sorted(int(s.input_ids) for s in order if s.expert == 0) == [0, 1, 2]
    assert [int(s.input_ids) for s in order] == [int(s.input_ids) for s in balanced_order(samples, 0, 0)]
    orders = {tuple(int(s.input_ids) for s in balanced_order(samples, seed, 0)) for seed in range(8)}
    assert len(orders) > 1  # the seed shuffles within a group


@pytest.fixture()
def em_config(tiny_zoo, tmp_path, write_config):
    def make(method: str = "expert_merging_pp", experts: list[str] = DOMAINS, calibration: dict | None = None,
             **params) -> Path:
        calibration = calibration if calibration is not None else {
            d: tiny_zoo / "data" / d / "calib.jsonl" for d in experts}
        return write_config(base=tiny_zoo / "base", experts=[tiny_zoo / "experts" / d for d in experts],
                            method=method, calibration={k: str(v) for k, v in calibration.items()},
                            params={**FAST, **params})
    return make


def test_em_pp_writes_checkpoint_coefficients_plot_and_report(em_config, tiny_zoo, tmp_path, run_cli):
    status, out, err = run_cli("merge", em_config(), tmp_path / "merged")
    assert status == 0, err
    merged = tmp_path / "merged"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "coefficients.json", "coefficients.png",
                 "calibration.json", "merge_config.yaml"):
        assert (merged / name).is_file(), name
    coefficients = json.loads((merged / "coefficients.json").read_text())
    report = json.loads((merged / "calibration.json").read_text())
    assert coefficients["experts"] == DOMAINS
    assert [s["name"] for s in report["stages"]] == ["expert_merging", "expert_merging_pp"]
    assert report["samples"] == dict.fromkeys(DOMAINS, 3)
    assert report["peak_memory_mb"] > 0 and report["task_vectors_mb"] > 0 and report["device"] == "cpu"
    tensors = coefficients["tensors"]
    # the default exclusions: embeddings, lm_head, norms stay at the base's value
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in tensors)
    assert len(tensors) == 2 * 7
    # EM++ allocation: B·L = 14 chunks at most; a tensor given none keeps one fixed coefficient
    allocated = report["chunks"]
    assert 0 < sum(allocated.values()) <= 14 and min(allocated.values()) == 0
    for name, entry in tensors.items():
        assert entry["chunks"] == max(1, allocated[name]) and entry["trained"] == (allocated[name] > 0)
        assert set(entry["alpha"]) == set(DOMAINS)
        assert all(len(row) == entry["chunks"] and all(0 < a < 1 for a in row) for row in entry["alpha"].values())

    # the checkpoint is exactly base + Σ α τ (float32), excluded tensors are the base's
    base, result = CheckpointReader(tiny_zoo / "base"), CheckpointReader(merged)
    experts = [CheckpointReader(tiny_zoo / "experts" / d) for d in DOMAINS]
    for name in base.names():
        if name not in tensors:
            assert torch.equal(result.read(name), base.read(name)), name
            continue
        theta0 = base.read(name).float()
        alpha = torch.tensor([tensors[name]["alpha"][d] for d in DOMAINS])
        task_vectors = torch.stack([(e.read(name).float() - theta0).view(-1) for e in experts])
        expected = theta0 + naive_combine(task_vectors, alpha, row_length(theta0.shape)).view_as(theta0)
        assert torch.allclose(result.read(name), expected, atol=1e-6), name


def test_apply_reproduces_the_merge_bit_for_bit_and_calibration_is_deterministic(em_config, tmp_path, run_cli):
    config = em_config(method="expert_merging")
    assert run_cli("merge", config, tmp_path / "a")[0] == 0
    assert run_cli("merge", config, tmp_path / "b")[0] == 0
    assert (tmp_path / "a" / "coefficients.json").read_bytes() == (tmp_path / "b" / "coefficients.json").read_bytes()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    status, out, err = run_cli("apply", tmp_path / "a" / "coefficients.json", "-o", tmp_path / "applied")
    assert status == 0, err
    assert (tmp_path / "applied" / "model.safetensors").read_bytes() == \
        (tmp_path / "a" / "model.safetensors").read_bytes()
    other = em_config(method="expert_merging", seed=1)
    assert run_cli("merge", other, tmp_path / "c")[0] == 0
    assert (tmp_path / "c" / "coefficients.json").read_bytes() != (tmp_path / "a" / "coefficients.json").read_bytes()


def test_calibration_lowers_its_objective(em_config, tmp_path, run_cli):
    config = em_config(method="expert_merging", gamma=0.0, lr=0.1, epochs=6)
    assert run_cli("merge", config, tmp_path / "m")[0] == 0
    steps = json.loads((tmp_path / "m" / "calibration.json").read_text())["stages"][0]["steps"]
    first = [s["loss"] for s in steps if s["epoch"] == 1]
    last = [s["loss"] for s in steps if s["epoch"] == 6]
    assert sum(last) / len(last) < 0.97 * sum(first) / len(first)


def test_stage2_can_start_from_init_and_fixed_tensors_keep_it(em_config, tmp_path, run_cli):
    config = em_config(stage2_init="init", budget=0.5, init=0.25)
    assert run_cli("merge", config, tmp_path / "m")[0] == 0
    tensors = json.loads((tmp_path / "m" / "coefficients.json").read_text())["tensors"]
    fixed = [t for t in tensors.values() if not t["trained"]]
    assert fixed and all(a == pytest.approx(0.25) for t in fixed for row in t["alpha"].values() for a in row)


def test_expert_without_calibration_data_warns(em_config, tiny_zoo, tmp_path, run_cli, caplog):
    config = em_config(method="expert_merging", calibration={"algebra": tiny_zoo / "data" / "algebra" / "calib.jsonl"})
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        status, _, err = run_cli("merge", config, tmp_path / "m")
    assert status == 0, err
    assert "no calibration data for code, biology" in caplog.text
    report = json.loads((tmp_path / "m" / "calibration.json").read_text())
    assert report["samples"] == {"algebra": 3, "code": 0, "biology": 0}


def test_long_calibration_text_is_truncated_with_a_warning(em_config, tmp_path, run_cli, caplog):
    long_text = tmp_path / "long.jsonl"
    write_jsonl(long_text, [Example("", "x = 1 + 2 " * 400)])
    config = em_config(method="expert_merging", experts=["algebra"], calibration={"algebra": long_text},
                       samples_per_expert=1)
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        status, _, err = run_cli("merge", config, tmp_path / "m")
    assert status == 0, err
    assert "1 calibration samples were longer than the model's context (128 tokens)" in caplog.text
    assert json.loads((tmp_path / "m" / "calibration.json").read_text())["sample_tokens"] == 128


@pytest.mark.parametrize(("change", "message"), [
    ({"calibration": {"astronomy": "x.jsonl"}}, "calibration.astronomy: no expert is named 'astronomy'"),
    ({"init": 1.5}, "params.init: Input should be less than 1"),
    ({"samples_per_expert": 0}, "params.samples_per_expert: Input should be greater than 0"),
    ({"hidden_layers": [9]}, "params.hidden_layers: 9 is out of range; the model has hidden states 0..2"),
    ({"lerning_rate": 0.1}, "params.lerning_rate: is not a known field"),
    ({"device": "tpu"}, "params.device:"),
    ({"exclude": ["*"]}, "params.exclude: every merged tensor is excluded"),
])
def test_bad_calibration_input_is_one_line_and_writes_nothing(em_config, tiny_zoo, tmp_path, run_cli, change, message):
    calibration = {d: tiny_zoo / "data" / d / "calib.jsonl" for d in DOMAINS} | change.pop("calibration", {})
    status, _, err = run_cli("merge", em_config(calibration=calibration, **change), tmp_path / "m")
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_empty_calibration_file_and_save_state_are_refused(em_config, tmp_path, run_cli):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    status, _, err = run_cli("merge", em_config(calibration={"algebra": empty}), tmp_path / "m")
    assert status == 2 and f"{empty}: empty data file" in err
    status, _, err = run_cli("merge", em_config(), tmp_path / "m", "--save-state", tmp_path / "state")
    assert status == 2 and "has no incremental state" in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "state").exists()


def test_non_finite_loss_stops_with_the_step_and_writes_nothing(em_config, tiny_zoo, tmp_path, run_cli, copy_model):
    broken = copy_model(tiny_zoo / "experts" / "code", "code")
    path = broken / "model.safetensors"
    info = read_header(path)["model.layers.0.mlp.up_proj.weight"]
    with open(path, "r+b") as f:  # a finite but huge task vector: activations overflow to inf
        f.seek(info.offset)
        f.write(torch.full(info.shape, 3e38).numpy().tobytes())
    config = em_config(method="expert_merging", calibration={"code": tiny_zoo / "data" / "code" / "calib.jsonl"})
    text = config.read_text().replace(str(tiny_zoo / "experts" / "code"), str(broken))
    config.write_text(text)
    status, _, err = run_cli("merge", config, tmp_path / "m")
    assert status == 2
    assert "expert_merging: loss is nan at optimizer step 1" in err or "loss is inf at optimizer step 1" in err
    assert not (tmp_path / "m").exists()
    assert not any(p.name.startswith(".m") for p in tmp_path.iterdir())
    shutil.rmtree(broken)


def test_blocks_run_one_at_a_time_reproduce_the_whole_model(tiny_zoo):
    from merging.calibration.blockwise import BlockwiseRunner
    from merging.calibration.params import CalibrationParams
    from merging.io.hf_loading import load_causal_lm

    expert = open_expert(tiny_zoo / "experts" / "code")
    runner = BlockwiseRunner(CheckpointReader(tiny_zoo / "base"), [expert], ["model.layers.0.mlp.up_proj.weight"],
                             [], [1.0], CalibrationParams(), 0, torch.device("cpu"), torch.float32, "test")
    ids = torch.tensor([[0, 17, 42, 99, 5, 230, 7]])
    with torch.no_grad():
        expected = load_causal_lm(tiny_zoo / "experts" / "code")(input_ids=ids, output_hidden_states=True)
        hidden = runner._embed([Sample(0, ids)], expert)[0]
        assert torch.equal(hidden, expected.hidden_states[0])
        hidden = runner.block_forward(0, runner._read_block(0, expert), hidden)
    assert torch.allclose(hidden, expected.hidden_states[1], atol=1e-6)  # the last entry has the final norm


def test_blockwise_mode_holds_one_block_of_task_vectors(em_config, tmp_path, run_cli):
    assert run_cli("merge", em_config(), tmp_path / "full")[0] == 0
    status, _, err = run_cli("merge", em_config(mode="blockwise"), tmp_path / "blocks")
    assert status == 0, err
    full = json.loads((tmp_path / "full" / "calibration.json").read_text())
    blocks = json.loads((tmp_path / "blocks" / "calibration.json").read_text())
    assert blocks["mode"] == "blockwise"
    assert blocks["task_vectors_mb"] == pytest.approx(full["task_vectors_mb"] / 2, rel=0.01)  # 2 equal blocks
    # two passes (stage 1, EM++ stage 2) over 2 blocks
    assert [s["name"] for s in blocks["stages"]] == ["expert_merging block 0", "expert_merging block 1",
                                                     "expert_merging_pp block 0", "expert_merging_pp block 1"]
    tensors = json.loads((tmp_path / "blocks" / "coefficients.json").read_text())["tensors"]
    assert len(tensors) == 14
    assert any(abs(a - 0.3) > 1e-3 for t in tensors.values() for row in t["alpha"].values() for a in row)


def test_blockwise_refuses_tensors_outside_blocks(em_config, tmp_path, run_cli):
    status, _, err = run_cli("merge", em_config(mode="blockwise", exclude=["*norm*"]), tmp_path / "m")
    assert status == 2 and "blockwise calibrates transformer blocks only" in err and "add it to params.exclude" in err


def test_apply_refuses_a_file_that_is_not_coefficients(tmp_path, run_cli):
    wrong = tmp_path / "coefficients.json"
    wrong.write_text('{"format": 1, "tensors": {}, "config": {"base": "x"}}')
    status, _, err = run_cli("apply", wrong, "-o", tmp_path / "m")
    assert status == 2 and f"{wrong}: config: experts: is required" in err
    wrong.write_text("[1, 2]")
    status, _, err = run_cli("apply", wrong, "-o", tmp_path / "m")
    assert status == 2 and "not a mergeplan coefficients.json" in err and not (tmp_path / "m").exists()


def test_format_1_coefficients_with_chunks_are_refused_and_layer_wise_ones_read(em_config, tmp_path, run_cli):
    assert run_cli("merge", em_config(method="expert_merging"), tmp_path / "m")[0] == 0
    data = json.loads((tmp_path / "m" / "coefficients.json").read_text())
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data | {"format": 1}))
    assert Coefficients.load(old).alpha.keys() == data["tensors"].keys()  # one chunk each: the same merge
    name, entry = next(iter(data["tensors"].items()))
    entry |= {"chunks": 2, "alpha": {e: row * 2 for e, row in entry["alpha"].items()}}
    old.write_text(json.dumps(data | {"format": 1}))
    with pytest.raises(ConfigError, match=f"format 1 cut {name} into chunks anywhere.*calibrate again"):
        Coefficients.load(old)


def test_one_merge_per_optimizer_step_gives_the_per_sample_gradient():
    from merging.calibration.expert_merging import Student, TrainableCoefficients, merged_weights, train_stage
    from merging.calibration.params import CalibrationParams

    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 3, generator=generator)}
    vectors = {"w": torch.randn(2, 12, generator=generator)}
    samples = [Sample(k % 2, torch.randn(1, 3, generator=generator)) for k in range(4)]
    targets = {id(s): torch.randn(1, 4, generator=generator) for s in samples}

    def losses(weights, sample):
        return ((sample.input_ids @ weights["w"].T - targets[id(sample)]) ** 2).mean(), torch.zeros(())

    start = {"w": torch.tensor([[0.3], [-0.2]])}
    params = CalibrationParams(grad_accumulation=4, gamma=0.5, init=0.4, grad_clip=None, epochs=1)
    coefficients = TrainableCoefficients(start, {})
    report = train_stage("t", coefficients, samples, Student(lambda a: merged_weights(base, vectors, a), losses),
                         [1.0, 2.0], params, seed=0)
    naive = TrainableCoefficients(start, {})  # rebuild the merged weights for every sample
    total = sum(((1.0, 2.0)[s.expert] * losses(merged_weights(base, vectors, naive.alpha()), s)[0]) / 4
                for s in samples) + 0.5 * naive.regulariser(naive.alpha(), 0.4)
    total.backward()
    assert report.steps[0]["grad_norm"] == pytest.approx(float(naive.raw["w"].grad.norm()), rel=1e-6)


def test_adamerging_lowers_the_entropy_without_teachers(em_config, tmp_path, run_cli):
    config = em_config(method="adamerging", lr=0.05, epochs=4, gamma=0.0)  # no pull, as the paper
    status, _, err = run_cli("merge", config, tmp_path / "m")
    assert status == 0, err
    report = json.loads((tmp_path / "m" / "calibration.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["adamerging"]
    assert report["teacher_cache_mb"] == 0 and report["params"]["activation"] == "clamp"
    steps = report["stages"][0]["steps"]
    first = sum(s["logit"] for s in steps if s["epoch"] == 1)
    last = sum(s["logit"] for s in steps if s["epoch"] == 4)
    assert last < first  # the mean next-token entropy of the merged model fell
    tensors = json.loads((tmp_path / "m" / "coefficients.json").read_text())["tensors"]
    values = [a for t in tensors.values() for row in t["alpha"].values() for a in row]
    assert all(0 <= a <= 1 for a in values) and any(abs(a - 0.3) > 1e-3 for a in values)
    status, _, err = run_cli("merge", em_config(method="adamerging", mode="blockwise"), tmp_path / "b")
    assert status == 2 and "params.mode" in err and not (tmp_path / "b").exists()


def test_kept_epochs_equal_a_shorter_run(em_config, tmp_path, run_cli):
    longer = em_config(method="expert_merging", epochs=3, keep_epochs=[1, 2])
    assert run_cli("merge", longer, tmp_path / "long")[0] == 0
    assert sorted(p.name for p in (tmp_path / "long" / "epochs").iterdir()) == [
        "coefficients-epoch-1.json", "coefficients-epoch-2.json"]
    assert run_cli("merge", em_config(method="expert_merging", epochs=1), tmp_path / "short")[0] == 0
    kept = json.loads((tmp_path / "long" / "epochs" / "coefficients-epoch-1.json").read_text())["tensors"]
    short = json.loads((tmp_path / "short" / "coefficients.json").read_text())["tensors"]
    assert kept == short  # the schedule depends on the step, not on the total: epoch 1 of 3 is a 1-epoch run
    final = json.loads((tmp_path / "long" / "coefficients.json").read_text())["tensors"]
    assert final != kept
    status, _, err = run_cli("apply", tmp_path / "long" / "epochs" / "coefficients-epoch-1.json", "-o",
                             tmp_path / "applied")
    assert status == 0, err
    status, _, err = run_cli("merge", em_config(method="expert_merging", epochs=2, keep_epochs=[3]), tmp_path / "x")
    assert status == 2 and "params.keep_epochs" in err and "outside 1..epochs (2)" in err
