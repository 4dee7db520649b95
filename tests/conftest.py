"""Shared fixtures: tiny random Llama checkpoints written once per session, and helpers to run the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from mergeplan.cli import main
from merging.io.synthetic import llama_config, write_random_base, write_random_expert

TINY = llama_config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64)
EXPERTS = 4


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path | list[Path]]:
    """A base and four experts, sharded (several files per checkpoint) to exercise the index."""
    root = tmp_path_factory.mktemp("zoo")
    base = write_random_base(root / "base", TINY, seed=0, max_shard_size=20_000)
    experts = [write_random_expert(base, root / f"expert{i}", seed=i + 1, max_shard_size=20_000)
               for i in range(EXPERTS)]
    return {"base": base, "experts": experts}


@pytest.fixture()
def copy_model(tmp_path):
    """Copy a checkpoint folder into this test's tmp dir, to damage it safely."""
    def copy(source: Path, name: str) -> Path:
        return Path(shutil.copytree(source, tmp_path / name))
    return copy


@pytest.fixture()
def write_config(tmp_path):
    def write(**fields) -> Path:
        data = {key: [str(e) if isinstance(e, Path) else e for e in value] if isinstance(value, list)
                else str(value) if isinstance(value, Path) else value for key, value in fields.items()}
        path = tmp_path / "merge.yaml"
        path.write_text(yaml.safe_dump(data))
        return path
    return write


@pytest.fixture()
def run_cli(capsys):
    """Run `mergeplan ARGS` in-process; returns (exit status, stdout, stderr)."""
    def run(*args: object) -> tuple[int, str, str]:
        status = main([str(a) for a in args])
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    return run


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """The `tiny` preset, built once per test session (about 30 s on 2 cores)."""
    from merging.zoo.build import build_zoo

    root = tmp_path_factory.mktemp("tiny_zoo")
    build_zoo("tiny", root)
    return root
