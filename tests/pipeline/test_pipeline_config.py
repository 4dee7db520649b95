"""The pipeline YAML: defaults, relative paths, and one-line errors that name the field."""

from __future__ import annotations

import pytest
import yaml

from flows.pipeline_config import load_pipeline_config
from merging.errors import ConfigError

MINIMAL = {"base": {"name": "tiny-base"}, "method": "ties", "data": "data"}


def write(tmp_path, data) -> object:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_relative_paths(tmp_path):
    config = load_pipeline_config(write(tmp_path, MINIMAL | {"calibration": {"algebra": "calib/a.jsonl"}}))
    assert config.experiment_name == "mergeplan/tiny-base" and config.experts == "all"
    assert config.data == tmp_path / "data" and config.calibration["algebra"] == tmp_path / "calib/a.jsonl"
    assert config.runner.kind == "threads" and config.law.min_gain == 0.002 and config.seed == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"method": None}, "pipeline.yaml: method: "),
    ({"base": {"name": "tiny.base"}}, "base.name: String should match pattern"),
    ({"base": {"name": "b", "uri": "http://x"}}, "base: uri 'http://x' is not an S3 URI"),
    ({"experts": ["/local/folder"]}, "experts: '/local/folder' is not an S3 URI"),
    ({"law": {"min_gain": 0}}, "law.min_gain: Input should be greater than 0"),
    ({"law": {"prefix_points": [0, 2]}}, "law.prefix_points: every k must be >= 1"),
    ({"runner": {"kind": "ray"}}, "runner.kind: Input should be 'threads' or 'dask'"),
    ({"runner": {"kind": "threads", "address": "tcp://x:1"}}, "runner: address is for kind: dask"),
    ({"surprise": 1}, "surprise: is not a known field"),
    ({"sweep": {"design": "random"}}, "sweep.design: Input should be"),
    ({"champion": {"margin": -0.1}}, "champion.margin: Input should be greater than or equal to 0"),
    ({"champion": {"domains": []}}, "champion.domains: List should have at least 1 item"),
    ({"log_model": True}, "log_model: true was removed: the registered version is itself an MLflow model"),
])
def test_bad_fields_are_one_line_naming_the_field(tmp_path, change, message):
    with pytest.raises(ConfigError) as error:
        load_pipeline_config(write(tmp_path, MINIMAL | change))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the pipeline config"):
        load_pipeline_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("base: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline_config(tmp_path / "bad.yaml")


def test_log_model_false_from_an_older_file_is_accepted(tmp_path):
    config = load_pipeline_config(write(tmp_path, MINIMAL | {"log_model": False}))
    assert "log_model" not in config.model_dump() and config.champion.margin == 0.0
