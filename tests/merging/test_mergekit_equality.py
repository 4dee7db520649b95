"""mergeplan equals mergekit 0.1.5 on the same YAML: every method, every config field, and configs shaped like
mergekit's examples (bench/mergekit_equality.py holds the cases). mergekit runs from its own venv through its
CLI; `make test-mergekit` installs it and runs these (they need about 5 s of mergekit start-up each)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# the cases live with the benchmark; loaded from its file, as bench/ is no package (its pipeline.py would shadow
# tests/pipeline on the path)
_SPEC = importlib.util.spec_from_file_location(
    "mergekit_equality", Path(__file__).resolve().parents[2] / "bench" / "mergekit_equality.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)
EQUAL, MERGEKIT_CLI, TOLERANCE = bench.EQUAL, bench.MERGEKIT_CLI, bench.TOLERANCE
cases, ensure_inputs, run_case = bench.cases, bench.ensure_inputs, bench.run_case

pytestmark = pytest.mark.mergekit
if not MERGEKIT_CLI.exists():
    pytest.skip("mergekit is not installed: `make test-mergekit` installs it into .venv-bench", allow_module_level=True)

CASES = cases({name: name for name in ("base", "other", "lora", *(f"expert{i}" for i in range(3)))})  # names only


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return ensure_inputs(tmp_path_factory.mktemp("mergekit_equality"))


@pytest.mark.parametrize("name", list(CASES))
def test_the_same_yaml_gives_mergekits_output(folders, name):
    config, expected = cases(folders)[name]
    largest, share, tensors = run_case(folders["base"].parent, name, config)
    assert tensors > 50
    if expected == EQUAL:
        assert largest <= TOLERANCE, f"{name}: largest difference {largest:.2e}"
    else:  # each tool's own random masks: same method, another draw, so most entries differ a little
        assert share > 0.5 and largest < 0.1
