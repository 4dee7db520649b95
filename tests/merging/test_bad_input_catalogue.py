"""The catalogue of refused inputs, data-driven: hostile safetensors files and index files, links out of a folder,
outputs over inputs, and bad arguments of every command. Each case asserts exit status 2, exactly one `error:`
line naming the thing, no traceback, nothing written and nothing existing changed (every file under the test's
folder hashed before and after). tests/test_bad_input.py holds the cases that need more than one command."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from merging.io.safetensors_file import MAX_HEADER_BYTES


@dataclass(frozen=True)
class Case:
    id: str
    # (work folder with base/ and expert0/, expert1/ copies) -> the CLI arguments
    arguments: Callable[[Path], list[str]]
    message: str  # in the error line


def safetensors(path: Path, header: dict, data: bytes, header_length: int | None = None) -> Path:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded) if header_length is None else header_length) + encoded + data)
    return path


def merge_args(work: Path, base: str = "base", out: str = "out", extra: tuple[str, ...] = (), **fields) -> list[str]:
    config = {"base": str(work / base), "experts": [str(work / "expert0"), str(work / "expert1")],
              "method": "average"} | fields
    path = work / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["merge", str(path), str(work / out), *extra]


def hostile_base(header: dict, data: bytes = b"\0" * 16, header_length: int | None = None):
    """A merge whose base's only weights file is the given raw safetensors file."""
    def arguments(work: Path) -> list[str]:
        for old in (work / "base").glob("model*.safetensors*"):
            old.unlink()
        safetensors(work / "base" / "model.safetensors", header, data, header_length)
        return merge_args(work)
    return arguments


def with_index(weight_map: dict[str, str]):
    def arguments(work: Path) -> list[str]:
        (work / "base" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return merge_args(work)
    return arguments


def linked_shard(work: Path) -> list[str]:
    shard = sorted((work / "base").glob("*.safetensors"))[0]
    outside = work / "elsewhere.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    return merge_args(work)


def linked_config(work: Path) -> list[str]:
    config = work / "base" / "config.json"
    outside = work / "elsewhere.json"
    shutil.move(config, outside)
    config.symlink_to(outside)
    return merge_args(work)


def base_weights(work: Path, data: bytes) -> list[str]:
    """A merge whose base's weights files all hold DATA."""
    for shard in (work / "base").glob("*.safetensors"):
        shard.write_bytes(data)
    return merge_args(work)


def duplicate_names_file() -> bytes:
    entry = json.dumps(F32)
    header = f'{{"a": {entry}, "a": {entry}}}'.encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + b"\0" * 8


def base_file(work: Path, name: str, text: str) -> list[str]:
    (work / "base" / name).write_text(text)
    return merge_args(work)


def index_with_a_stranger(work: Path) -> list[str]:
    index_path = work / "base" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.stranger.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    return merge_args(work)


def wrong_kind_of_table(work: Path) -> list[str]:
    (work / "t.txt").write_text("k,ce\n")
    return ["fit", str(work / "t.txt"), "--out", str(work / "fit")]


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

CASES = [
    # hostile safetensors headers
    Case("overlapping-offsets", hostile_base({"a": F32, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}),
         "tensors 'a' and 'b' overlap"),
    Case("offsets-past-the-end", hostile_base({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}),
         "truncated: tensor 'a' ends at byte 32"),
    Case("negative-offset", hostile_base({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}),
         "tensor 'a' has offsets -8..0"),
    Case("offsets-not-the-shape", hostile_base({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}),
         "tensor 'a' has offsets 0..8 for 12 bytes"),
    Case("negative-dimension", hostile_base({"a": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}),
         "tensor 'a' has offsets"),
    Case("unknown-dtype", hostile_base({"a": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}}),
         "tensor 'a' has dtype 'Q4_K'"),
    Case("missing-dtype", hostile_base({"a": {"shape": [2], "data_offsets": [0, 8]}}), "tensor 'a' has dtype None"),
    Case("shape-not-a-list", hostile_base({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}),
         "bad header entry for tensor 'a'"),
    Case("offsets-missing", hostile_base({"a": {"dtype": "F32", "shape": [2]}}), "bad header entry for tensor 'a'"),
    Case("entry-not-an-object", hostile_base({"a": [1, 2]}), "bad header entry for tensor 'a': not a JSON object"),
    Case("duplicate-tensor-names", lambda work: base_weights(work, duplicate_names_file()), "appears twice"),
    Case("header-length-near-the-limit", hostile_base({"a": F32}, header_length=MAX_HEADER_BYTES - 8),
         f"header claims {MAX_HEADER_BYTES - 8} bytes"),
    Case("header-length-over-the-limit", hostile_base({"a": F32}, header_length=MAX_HEADER_BYTES + 1),
         f"header claims {MAX_HEADER_BYTES + 1} bytes"),
    Case("header-length-zero", hostile_base({"a": F32}, header_length=0), "header is not JSON"),
    Case("header-a-json-list", lambda work: base_weights(work, struct.pack("<Q", 8) + b"[1,2,3] " + b"\0" * 8),
         "header is not a JSON object"),
    Case("file-shorter-than-its-prefix", lambda work: base_weights(work, b"\x01\x02"), "too short for a header"),
    # index files
    Case("index-absolute-shard", with_index({"model.embed_tokens.weight": "/etc/passwd"}),
         "names shard '/etc/passwd', which is not a file name in the folder"),
    Case("index-dotdot-shard", with_index({"model.embed_tokens.weight": "../expert0/model.safetensors"}),
         "names shard '../expert0/model.safetensors'"),
    Case("index-dotdot-alone", with_index({"model.embed_tokens.weight": ".."}), "names shard '..'"),
    Case("index-shard-not-a-string", with_index({"model.embed_tokens.weight": 3}), "names shard 3"),
    Case("index-empty-weight-map", with_index({}), "no weight_map"),
    Case("index-missing-shard", with_index({"model.embed_tokens.weight": "model-9-of-9.safetensors"}),
         "names shard model-9-of-9.safetensors which is missing"),
    Case("index-names-a-tensor-not-in-its-shard", index_with_a_stranger,
         "tensor model.stranger.weight is not in shard"),
    Case("index-not-json", lambda work: base_file(work, "model.safetensors.index.json", "{oops"),
         "cannot be read as JSON"),
    # links and output folders
    Case("shard-linked-out-of-the-folder", linked_shard, "outside"),
    Case("config-linked-out-of-the-folder", linked_config, "outside"),
    Case("output-inside-the-base", lambda work: merge_args(work, out="base/merged"), "is inside the input"),
    Case("output-is-an-expert-with-overwrite", lambda work: merge_args(work, out="expert1", extra=("--overwrite",)),
         "output folder"),
    Case("output-contains-the-base-with-overwrite",
         lambda work: merge_args(work, out=".", extra=("--overwrite",)), "contains the input"),
    # configs
    Case("config-not-json", lambda work: base_file(work, "config.json", "{"), "config.json: cannot be read as JSON"),
    Case("config-a-json-list", lambda work: base_file(work, "config.json", "[]"), "expected a JSON object"),
    Case("weight-not-a-number", lambda work: merge_args(work, experts=[
        {"path": str(work / "expert0"), "weight": "heavy"}]), "weight"),
    Case("unknown-top-level-field", lambda work: merge_args(work, mehtod="ties"), "mehtod"),
    Case("max-shard-size-not-a-size", lambda work: merge_args(work, max_shard_size="big"), "max_shard_size"),
    Case("dtype-unknown", lambda work: merge_args(work, dtype="float7"), "dtype"),
    Case("include-matches-nothing", lambda work: merge_args(work, include=["nothing.*"]), "include"),
    Case("expert-folder-missing", lambda work: merge_args(work, experts=[str(work / "nope")]), "nope"),
    Case("config-file-missing", lambda work: ["merge", str(work / "absent.yaml"), str(work / "out")], "absent.yaml"),
    Case("slerp-of-two-experts", lambda work: merge_args(work, method="slerp", params={"t": 0.5}),
         "slerp takes at most 1 expert(s), got 2"),
    Case("model-stock-of-one-expert", lambda work: merge_args(work, method="model_stock",
                                                              experts=[str(work / "expert0")]),
         "model_stock needs at least 2 experts, got 1"),
    Case("model-stock-with-a-weight", lambda work: merge_args(work, method="model_stock", experts=[
        str(work / "expert0"), {"path": str(work / "expert1"), "weight": 2}]), "experts.1.weight"),
    Case("della-epsilon-past-density", lambda work: merge_args(work, method="della",
                                                               params={"density": 0.2, "epsilon": 0.3}),
         "params.epsilon"),
    # other commands
    Case("evaluate-missing-model", lambda work: ["evaluate", str(work / "nope"), "--data", str(work)], "nope"),
    Case("fit-missing-table", lambda work: ["fit", str(work / "nope.parquet"), "--out", str(work / "fit")],
         "nope.parquet"),
    Case("fit-table-of-the-wrong-kind", wrong_kind_of_table, "t.txt"),
    Case("plan-missing-fit", lambda work: ["plan", str(work / "nofit")], "nofit"),
    Case("sweep-missing-zoo", lambda work: ["sweep", "--zoo", str(work / "nozoo"), "--out", str(work / "s.parquet")],
         "nozoo"),
    Case("sweep-unknown-method", lambda work: ["sweep", "--zoo", str(work), "--out", str(work / "s.parquet"),
                                               "--methods", "soup"], "soup"),
    Case("sweep-of-model-stock", lambda work: ["sweep", "--zoo", str(work), "--out", str(work / "s.parquet"),
                                               "--methods", "model_stock"], "sweep.model_stock: a sweep merges"),
    Case("sweep-of-slerp", lambda work: ["sweep", "--zoo", str(work), "--out", str(work / "s.parquet"),
                                         "--methods", "slerp", "--param", "slerp.t=0.5"],
         "sweep.slerp: a sweep merges"),
    Case("zoo-unknown-preset", lambda work: ["zoo", "build", "--preset", "huge", "--out", str(work / "z")], "huge"),
    Case("apply-missing-coefficients", lambda work: ["apply", str(work / "c.json"), "-o", str(work / "out")],
         "c.json"),
    Case("add-expert-missing-state", lambda work: ["add-expert", str(work / "state"), str(work / "expert0"),
                                                   "-o", str(work / "out")], "state"),
]


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under FOLDER with its content hash (links by target), to prove nothing changed."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = "link:" + str(path.readlink())
        elif path.is_file():
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[key] = "dir"
    return state


@pytest.fixture()
def work(zoo, tmp_path) -> Path:
    shutil.copytree(zoo["base"], tmp_path / "base")
    for index in (0, 1):
        shutil.copytree(zoo["experts"][index], tmp_path / f"expert{index}")
    return tmp_path


def test_catalogue_has_at_least_forty_cases():
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_refused(case, work, run_cli):
    arguments = case.arguments(work)
    before = snapshot(work)
    status, _, stderr = run_cli(*arguments)
    assert status == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert case.message in errors[0], errors[0]
    assert snapshot(work) == before, "something was written or changed"
