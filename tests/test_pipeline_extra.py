"""Without the `pipeline` extra mergeplan is a merge tool alone: merges run, pipeline commands say in one line
what to install. The extra's packages are made unimportable in a child interpreter (None in sys.modules)."""

from __future__ import annotations

import subprocess
import sys

import yaml

from mergeplan.cli import PIPELINE_PACKAGES

WITHOUT_PIPELINE = f"""
import sys
for name in {sorted(PIPELINE_PACKAGES)!r}:
    sys.modules[name] = None
from mergeplan.cli import main
status = main(sys.argv[1:])
assert not any(sys.modules.get(name) for name in {sorted(PIPELINE_PACKAGES)!r}), "a pipeline package was imported"
sys.exit(status)
"""


def without_pipeline(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_PIPELINE, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_a_merge_needs_no_pipeline_package(zoo, tmp_path):
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"base": str(zoo["base"]), "experts": [str(e) for e in zoo["experts"][:2]],
                                      "method": "ties", "params": {"density": 0.5}}))
    done = without_pipeline("merge", config, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "config.json").is_file() and list((tmp_path / "out").glob("*.safetensors"))


def test_a_pipeline_command_names_the_extra_in_one_line(tmp_path):
    for args in (["status"], ["run", tmp_path / "pipeline.yaml"], ["expert", "list", "--base", "b"]):
        done = without_pipeline(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'mergeplan[pipeline]'" in lines[0], (args, done.stderr)
        assert f"mergeplan {args[0]} needs the pipeline extra" in lines[0]
