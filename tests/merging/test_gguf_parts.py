"""A GGUF in byte chunks: joined in order into the same model as the whole file, found in installed packages,
and every way the parts can be wrong is a one-line error naming the part that writes nothing."""

import hashlib
import json
import shutil

import pytest
import torch
from gguf_files import split_gguf, write_llama_gguf, write_tensors_gguf

from merging.errors import ConfigError
from merging.io.gguf_parts import expected_gguf_size, joined_gguf, packaged_gguf, parts_sha256
from merging.io.hf_loading import load_causal_lm
from merging.zoo import build
from merging.zoo.presets import get_preset

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_zoo, tmp_path_factory):
    return write_llama_gguf(tiny_zoo / "base", tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture()
def tensors_gguf(tmp_path):
    (tmp_path / "whole").mkdir()
    return write_tensors_gguf(tmp_path / "whole" / "model.gguf")


def test_the_header_gives_the_file_size_for_float_and_quantized_tensors(tensors_gguf, tiny_gguf):
    for path in (tensors_gguf, tiny_gguf):
        with open(path, "rb") as f:
            expected, padded = expected_gguf_size(f, str(path))
        assert expected <= path.stat().st_size == padded


def test_parts_joined_import_as_the_whole_file(tiny_zoo, tiny_gguf, tmp_path, run_cli):
    parts = split_gguf(tiny_gguf, tmp_path / "parts", 4)
    assert parts_sha256(parts) == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    status, out, err = run_cli("base", "import-gguf", *parts, "--out", tmp_path / "imported")
    assert status == 0, err
    ids = torch.tensor([[1, 5, 9, 33, 2, 17]])
    with torch.no_grad():
        expected = load_causal_lm(tiny_zoo / "base")(input_ids=ids).logits
        imported = load_causal_lm(tmp_path / "imported")(input_ids=ids).logits
    assert torch.equal(imported, expected)
    assert not list(tmp_path.glob(".imported*"))


def test_the_joined_file_lives_in_a_temporary_folder_removed_afterwards(tensors_gguf, tmp_path):
    parts = split_gguf(tensors_gguf, tmp_path / "parts", 3)
    with joined_gguf(parts) as joined:
        assert joined.name == "model.gguf" and joined.read_bytes() == tensors_gguf.read_bytes()
    assert not joined.parent.exists()


def damage(parts: list, tensors_gguf, case: str) -> tuple[list, str]:
    """The parts as given for `case`, and what the error must say."""
    p0, p1, p2, p3 = parts
    if case == "missing_file":
        p2.unlink()
        return parts, f"{p2}: no such GGUF part (part 3 of 4)"
    if case == "empty":
        p1.write_bytes(b"")
        return parts, f"{p1}: empty GGUF part (part 2 of 4)"
    if case == "gap":
        return [p0, p1, p3], f"{p3}: the part numbered 2 is missing before it (after {p1.name})"
    if case == "last_left_out":
        return [p0, p1, p2], f"{p2}: truncated, or a part is missing: the 3 parts hold"
    if case == "out_of_order":
        return [p0, p2, p1, p3], f"{p1}: out of order (part 3 of 4, numbered 1, after {p2.name})"
    if case == "header_not_first":
        return [p1, p0, p2, p3], f"{p1}: the first part does not start with the GGUF header; {p0} does, give it first"
    if case == "given_twice":
        return [p0, p1, p1, p3], f"{p1}: given twice (parts 2 and 3 of 4)"
    if case == "same_bytes":
        shutil.copy(p1, p2)
        return parts, f"{p2}: the same bytes as {p1} (parts 2 and 3 of 4); a part is duplicated"
    if case == "truncated_middle":
        p1.write_bytes(p1.read_bytes()[:-100])
        return parts, f"{p1}: truncated, or a part is missing: the 4 parts hold"
    if case == "truncated_last":
        p3.write_bytes(p3.read_bytes()[:-200])
        return parts, f"{p3}: truncated, or a part is missing"
    if case == "extra_bytes":
        p3.write_bytes(p3.read_bytes() + b"x" * 100)
        return parts, f"{p3}: the 4 parts hold"
    if case == "whole_file_as_part":
        shutil.copy(tensors_gguf, p2)
        return parts, f"{p2}: part 3 of 4 starts with its own GGUF header"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_file", "empty", "gap", "last_left_out", "out_of_order", "header_not_first",
                                  "given_twice", "same_bytes", "truncated_middle", "truncated_last", "extra_bytes",
                                  "whole_file_as_part"])
def test_bad_parts_are_one_line_errors_naming_the_part_and_write_nothing(tensors_gguf, tmp_path, run_cli, case):
    parts, message = damage(split_gguf(tensors_gguf, tmp_path / "parts", 4), tensors_gguf, case)
    status, _, err = run_cli("base", "import-gguf", *parts, "--out", tmp_path / "out")
    assert status == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_shortfall_names_the_expected_size(tensors_gguf, tmp_path, run_cli):
    parts = split_gguf(tensors_gguf, tmp_path / "parts", 4)
    parts[1].write_bytes(parts[1].read_bytes()[:-100])
    with open(tensors_gguf, "rb") as f:
        expected, _ = expected_gguf_size(f, "whole")
    _, _, err = run_cli("base", "import-gguf", *parts, "--out", tmp_path / "out")
    assert f"the GGUF header implies {expected:,} ({expected - tensors_gguf.stat().st_size + 100:,} short)" in err


def install_fake_chunks(site, name: str, parts: list, declared: int | None = None) -> None:
    """What `pip install NAME-gguf-part1 ...` leaves: a module per chunk with data/FILE.partNN, and its metadata."""
    stem = name.replace("-", "_")
    for number, part in enumerate(parts, start=1):
        module = site / f"{stem}_gguf_part{number}"
        (module / "data").mkdir(parents=True)
        (module / "__init__.py").write_text("")
        shutil.copy(part, module / "data" / part.name)
        info = site / f"{stem}_gguf_part{number}-1.0.0.dist-info"
        info.mkdir()
        total = f" of {declared}" if declared else ""
        (info / "METADATA").write_text(f"Metadata-Version: 2.4\nName: {name}-gguf-part{number}\nVersion: 1.0.0\n"
                                       f"Summary: Chunk {number}{total} for a test GGUF.\n")


def test_package_finds_the_installed_chunks_in_order_and_imports_them(tiny_zoo, tiny_gguf, tmp_path, run_cli,
                                                                     monkeypatch):
    parts = split_gguf(tiny_gguf, tmp_path / "parts", 3)
    install_fake_chunks(tmp_path / "site", "tiny-test", parts, declared=3)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    found = packaged_gguf("tiny-test")
    assert [p.name for p in found] == [p.name for p in parts] and found[0].parent.parent.name == "tiny_test_gguf_part1"
    assert packaged_gguf("tiny-test-gguf") == found
    status, _, err = run_cli("base", "import-gguf", "--package", "tiny-test", "--out", tmp_path / "imported")
    assert status == 0, err
    assert json.loads((tmp_path / "imported" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_package_lookup_errors(tensors_gguf, tmp_path, run_cli, monkeypatch):
    parts = split_gguf(tensors_gguf, tmp_path / "parts", 3)
    install_fake_chunks(tmp_path / "site", "gap-test", parts[:1], declared=3)
    install_fake_chunks(tmp_path / "site", "short-test", parts[:2])  # no declared count: the size check finds it
    (tmp_path / "site" / "whole_test").mkdir()
    (tmp_path / "site" / "whole_test" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ConfigError, match=r"gap-test-gguf-part2 is not installed \(part 2 of 3 of gap-test's GGUF\): "
                                          "pip install gap-test-gguf-part1 gap-test-gguf-part2 gap-test-gguf-part3"):
        packaged_gguf("gap-test")
    with pytest.raises(ConfigError, match="nothing-here: not installed; pip install nothing-here"):
        packaged_gguf("nothing-here")
    with pytest.raises(ConfigError, match="whole-test: the installed package has no .gguf file"):
        packaged_gguf("whole-test")
    status, _, err = run_cli("base", "import-gguf", "--package", "short-test", "--out", tmp_path / "out")
    assert status == 2 and "truncated, or a part is missing: the 2 parts hold" in err
    status, _, err = run_cli("base", "import-gguf", "--out", tmp_path / "out")
    assert status == 2 and "give the GGUF file (or its parts, in order) or --package NAME" in err
    shutil.copy(tensors_gguf, tmp_path / "site" / "whole_test" / "model.gguf")
    assert packaged_gguf("whole-test") == [tmp_path / "site" / "whole_test" / "model.gguf"]


def test_the_zoo_base_from_parts_is_the_base_from_the_whole_file(tiny_gguf, tmp_path, monkeypatch):
    parts = split_gguf(tiny_gguf, tmp_path / "parts", 3)
    first = build.import_base(tmp_path / "base", parts)

    def no_import(*args, **kwargs):
        raise AssertionError("imported again")

    monkeypatch.setattr(build, "write_gguf_as_hf", no_import)
    assert build.import_base(tmp_path / "base", tiny_gguf) == first


def test_real_gemma_takes_its_base_from_the_chunk_packages(tensors_gguf, tmp_path, monkeypatch):
    preset = get_preset("real-gemma")
    assert preset.base_package == "gemma3-270m-q4-k-m" and preset.lora == get_preset("real").lora
    assert preset.domains == get_preset("real").domains and preset.split_sizes == get_preset("real").split_sizes
    parts = split_gguf(tensors_gguf, tmp_path / "parts", 2)
    install_fake_chunks(tmp_path / "site", "fake-base", parts, declared=2)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert build._base_source(preset.model_copy(update={"base_package": "fake-base"}), None) == packaged_gguf(
        "fake-base")
    assert build._base_source(preset, parts[:1]) == parts[0]
    assert build._base_source(preset, parts) == parts


def test_zoo_build_takes_parts_and_names_a_missing_one(tensors_gguf, tmp_path, run_cli):
    parts = split_gguf(tensors_gguf, tmp_path / "parts", 3)
    parts[1].unlink()
    status, _, err = run_cli("zoo", "build", "--preset", "real-gemma", "--domains", "algebra", "--base-gguf", *parts,
                             "--out", tmp_path / "zoo", "--device", "cpu")
    assert status == 2 and f"{parts[1]}: no such GGUF part (part 2 of 3)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "zoo" / "base").exists()
