"""mergeplan equals mergekit 0.1.5 on the same YAML: every method, every config field, and configs shaped like
mergekit's examples (bench/mergekit_equality.py holds the cases). mergekit runs from its own venv through its
CLI; `make test-mergekit` installs it and runs these (they need about 5 s of mergekit start-up each)."""

from __future__ import annotations

import pytest
from mergekit_equality import EQUAL, MERGEKIT_CLI, TOLERANCE, cases, ensure_inputs, run_case

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
