"""Block-by-block merging (merging/streaming.py) against the whole-tensor fold it replaces, and the device option.

Every tensor of the tiny zoo is larger than the forced block size, so each merge here folds several blocks per
tensor; the whole-tensor path (the fold every other method takes) is the reference, bit for bit.
"""

import pytest
import torch

import merging.streaming as streaming
from merging import CheckpointError, ConfigError, ExpertRef, MergeConfig, add_experts, merge
from merging.io.checkpoint import CheckpointReader
from merging.methods.sparsify import magnitude_trim_

BLOCK = 96  # entries: the tiny zoo's tensors hold 32 to 2048


@pytest.fixture()
def small_blocks(monkeypatch):
    monkeypatch.setattr(streaming, "BLOCK_ENTRIES", BLOCK)
    calls = []
    merge_blocks = streaming.BlockMerge.merge
    monkeypatch.setattr(streaming.BlockMerge, "merge", lambda self, name: calls.append(name) or
                        merge_blocks(self, name))
    return calls


def whole_only(monkeypatch):
    monkeypatch.setattr(streaming, "blockwise", lambda *args: False)


def read_all(folder):
    is_state = (folder / "state.json").is_file()
    reader = CheckpointReader(folder, prefix="accumulators", config_name="state.json") if is_state else \
        CheckpointReader(folder)
    return {name: reader.read(name) for name in reader.names()}


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def config(zoo, method, params, weights=(1.0, 0.7, 1.3), dtype="bfloat16", **fields):
    return MergeConfig(base=zoo["base"], experts=[ExpertRef(path=path, weight=w) for path, w in
                                                  zip(zoo["experts"], weights, strict=False)],
                       method=method, params=params, dtype=dtype, **fields)


CASES = [
    ("task_arithmetic", {"lambda": 0.9}, "bfloat16"),
    ("task_arithmetic", {"lambda": 0.8, "normalize": True}, "float32"),
    ("average", {}, None),
    ("ties", {"density": 0.3, "lambda": 1.1}, "bfloat16"),
    ("ties", {"density": 0.5, "normalize": False}, "float32"),
    ("ties", {"density": 1.0}, "bfloat16"),
]


@pytest.mark.parametrize(("method", "params", "dtype"), CASES)
def test_blockwise_merge_equals_the_whole_tensor_fold(zoo, tmp_path, monkeypatch, small_blocks, method, params,
                                                      dtype):
    merge(config(zoo, method, params, dtype=dtype), tmp_path / "blocks")
    assert len(small_blocks) == len(CheckpointReader(zoo["base"]).names())  # every tensor went block by block
    whole_only(monkeypatch)
    merge(config(zoo, method, params, dtype=dtype), tmp_path / "whole")
    assert_bit_identical(read_all(tmp_path / "blocks"), read_all(tmp_path / "whole"))


def test_blockwise_incremental_merge_equals_whole_and_batch(zoo, tmp_path, monkeypatch, small_blocks):
    first = config(zoo, "ties", {"density": 0.4}, weights=(1.0, 0.5))
    merge(first, tmp_path / "two", save_state=tmp_path / "state")
    add_experts(tmp_path / "state", [ExpertRef(path=zoo["experts"][2], weight=1.5)], tmp_path / "three",
                state_out=tmp_path / "state3")
    merge(config(zoo, "ties", {"density": 0.4}, weights=(1.0, 0.5, 1.5)), tmp_path / "batch",
          save_state=tmp_path / "batch-state")
    assert_bit_identical(read_all(tmp_path / "three"), read_all(tmp_path / "batch"))
    whole_only(monkeypatch)
    merge(first, tmp_path / "two-whole", save_state=tmp_path / "state-whole")
    add_experts(tmp_path / "state-whole", [ExpertRef(path=zoo["experts"][2], weight=1.5)], tmp_path / "three-whole",
                state_out=tmp_path / "state3-whole")
    assert_bit_identical(read_all(tmp_path / "three"), read_all(tmp_path / "three-whole"))
    assert_bit_identical(read_all(tmp_path / "state"), read_all(tmp_path / "state-whole"))
    assert_bit_identical(read_all(tmp_path / "state3"), read_all(tmp_path / "state3-whole"))
    assert_bit_identical(read_all(tmp_path / "state3"), read_all(tmp_path / "batch-state"))


def test_methods_that_need_the_whole_tensor_are_not_blocked(zoo, tmp_path, small_blocks):
    merge(config(zoo, "ties", {"density": 0.5, "rescale": True}), tmp_path / "rescaled")  # an L1 norm per tensor
    merge(config(zoo, "dare_linear", {"density": 0.5}), tmp_path / "dare")  # one random draw per tensor
    assert small_blocks == []


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.999])
def test_trim_over_blocks_keeps_the_entries_of_the_whole_tensor_trim(density):
    generator = torch.Generator().manual_seed(1)
    base = (torch.randn(5000, generator=generator) * 0.02).bfloat16().float()
    delta = (base + torch.randn(5000, generator=generator) * 0.002).bfloat16().float() - base  # many equal |τ|
    delta[::7] = 0.0
    keep = streaming.trim_keep(streaming.Ties(streaming.Ties.Params(density=density)), delta.numel())
    trim, scratch = streaming.Trim(keep, torch.device("cpu")), streaming.Scratch()
    blocks = [(start, min(start + 333, delta.numel())) for start in range(0, delta.numel(), 333)]
    for count, choose in ((trim.count_high, trim.choose_bucket), (trim.count_low, trim.choose_threshold)):
        for start, stop in blocks:
            count(delta[start:stop].abs().view(torch.int32), scratch)
        choose()
    trimmed = torch.cat([trim.apply(delta[start:stop].clone(), scratch) for start, stop in blocks])
    expected = magnitude_trim_(delta.clone(), density)
    assert torch.equal(trimmed.view(torch.int32), expected.view(torch.int32))
    assert int((trimmed != 0).sum()) <= keep and trim.ties > 0


def test_device_cpu_gives_the_default_output(zoo, tmp_path, small_blocks):
    merge(config(zoo, "ties", {"density": 0.3}), tmp_path / "default")
    merge(config(zoo, "ties", {"density": 0.3}, device="cpu"), tmp_path / "config-cpu")
    merge(config(zoo, "dare_ties", {"density": 0.5}), tmp_path / "dare", device="cpu")  # merged whole
    merge(config(zoo, "dare_ties", {"density": 0.5}), tmp_path / "dare-default")
    assert_bit_identical(read_all(tmp_path / "default"), read_all(tmp_path / "config-cpu"))
    assert_bit_identical(read_all(tmp_path / "dare"), read_all(tmp_path / "dare-default"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_cuda_device_is_one_line(zoo, tmp_path, write_config, run_cli):
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        merge(config(zoo, "task_arithmetic", {}, device="cuda"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    path = write_config(base=zoo["base"], experts=zoo["experts"][:2], method="task_arithmetic")
    status, _, err = run_cli("merge", path, tmp_path / "cli", "--device", "cuda")
    assert status == 2 and "no CUDA device is available" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cli").exists()
    with pytest.raises(ConfigError, match="not a device"):
        merge(config(zoo, "task_arithmetic", {}), tmp_path / "out", device="tpu")


def test_a_non_finite_block_names_the_expert(zoo, tmp_path, copy_model, small_blocks):
    from merging.io.checkpoint import CheckpointWriter

    reader = CheckpointReader(zoo["experts"][1])
    broken = tmp_path / "broken"
    with CheckpointWriter(broken, [(n, i.dtype, i.shape) for n, i in reader.tensors.items()]) as writer:
        for name in reader.names():
            tensor = reader.read(name)
            if name == "model.embed_tokens.weight":
                tensor[20, 3] = float("nan")
            writer.write(name, tensor)
        writer.copy_companions(reader.folder, ["config.json"])
    experts = [zoo["experts"][0], broken]
    with pytest.raises(CheckpointError, match="broken: tensor model.embed_tokens.weight contains NaN"):
        merge(MergeConfig(base=zoo["base"], experts=experts, method="ties", params={"density": 0.5}), tmp_path / "o")


def test_the_device_is_a_run_choice_not_part_of_the_saved_state(zoo, tmp_path):
    import json

    merge(config(zoo, "task_arithmetic", {}, weights=(1.0, 1.0)), tmp_path / "out", save_state=tmp_path / "state",
          device="cpu")
    assert "device" not in json.loads((tmp_path / "state" / "state.json").read_text())["config"]
    add_experts(tmp_path / "state", [zoo["experts"][2]], tmp_path / "three")  # on the CPU, as any add-expert
