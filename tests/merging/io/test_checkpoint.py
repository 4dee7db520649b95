"""The safetensors reader and writer against the reference `safetensors` library, sharding and atomicity."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merging.errors import CheckpointError
from merging.io.checkpoint import CheckpointReader, CheckpointWriter, parse_size, plan_shards
from merging.io.safetensors_file import SafetensorsFileWriter, read_header, read_tensor

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool, torch.float64]


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {f"t{i}.{str(d).split('.')[-1]}": (torch.randn(3, 5, generator=g) * 10).to(d)
            for i, d in enumerate(DTYPES)} | {"scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}


def test_our_files_read_by_safetensors_and_back(tmp_path):
    tensors = sample_tensors()
    writer = SafetensorsFileWriter(tmp_path / "a.safetensors",
                                   [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
    for name in reversed(list(tensors)):  # any write order
        writer.write(name, tensors[name])
    writer.close()
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, tensor in tensors.items():
            assert torch.equal(f.get_tensor(name), tensor), name
    save_file(tensors, tmp_path / "b.safetensors")
    for name, info in read_header(tmp_path / "b.safetensors").items():
        assert torch.equal(read_tensor(info), tensors[name]), name


def test_writer_refuses_a_tensor_unlike_its_layout(tmp_path):
    writer = SafetensorsFileWriter(tmp_path / "a.safetensors", [("x", torch.float32, (2,))])
    with pytest.raises(ValueError, match="layout says"):
        writer.write("x", torch.zeros(3))
    writer.close()


def test_plan_shards_respects_the_size_and_keeps_order():
    layout = [(f"t{i}", torch.float32, (100,)) for i in range(10)] + [("big", torch.float32, (1000,))]
    shards = plan_shards(layout, 1000)
    assert [len(s) for s in shards] == [2, 2, 2, 2, 2, 1]
    assert [e[0] for s in shards for e in s] == [e[0] for e in layout]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size(7) == 7
    with pytest.raises(ValueError):
        parse_size("five gigs")


def test_writer_is_atomic_on_error(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), CheckpointWriter(target, [("x", torch.float32, (2,))]) as out:
        out.write("x", torch.zeros(2))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_to_finish_with_unwritten_tensors(tmp_path):
    with pytest.raises(RuntimeError, match="never written"), \
            CheckpointWriter(tmp_path / "m", [("x", torch.float32, (2,)), ("y", torch.float32, (1,))]) as out:
        out.write("x", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_sharded_round_trip(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((10, 10), float(i)) for i in range(5)}
    with CheckpointWriter(tmp_path / "m", [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                          max_shard_size=800) as out:
        for name, tensor in tensors.items():
            out.write(name, tensor)
        out.write_json("config.json", {"model_type": "test"})
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in range(1, 4)]
    reader = CheckpointReader(tmp_path / "m")
    assert reader.names() == list(tensors)
    assert all(torch.equal(reader.read(n), t) for n, t in tensors.items())


def test_index_naming_a_tensor_absent_from_its_shard(tmp_path):
    with CheckpointWriter(tmp_path / "m", [("a", torch.float32, (2,)), ("b", torch.float32, (2,))],
                          max_shard_size=8) as out:
        out.write("a", torch.zeros(2))
        out.write("b", torch.ones(2))
        out.write_json("config.json", {})
    index_path = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["b"] = index["weight_map"]["a"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="tensor b is not in shard model-00001-of-00002.safetensors"):
        CheckpointReader(tmp_path / "m")
