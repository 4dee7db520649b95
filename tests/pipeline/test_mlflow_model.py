"""A registered merge is an MLflow model in place: MLflow's own loaders read it from the merged S3 folder, and
`mergeplan evaluate models:/...` evaluates it; against real servers (moto S3, an MLflow server, Prefect's harness)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.models import Model
from mlops_support import ACCESS_KEY, SECRET_KEY
from pipeline_support import PIPELINE_DOMAINS, pipeline_config, store_expert

from flows.merge_pipeline import merge_pipeline
from flows.runtime import configured
from infra.mlflow_model import MLMODEL, TOKENIZER_FOLDER, mlflow_client_env, mlflow_model_files
from infra.registry import CHAMPION, HEAD, merged_model_name, register_merged, set_alias
from infra.s3 import S3Location, read_manifest, s3_client, upload_expert
from merging.data.loading import load_split
from merging.errors import CheckpointError
from merging.evaluate import cross_entropy

# Bases of their own: another module's first run must still find merged.zoo-base without a champion, and deleting
# versions here must leave the others be. The experts are the pipeline tests' (same content, same merge key).
BASE = "mlflow-base"
SCRATCH = "mlflow-scratch"
DOMAIN = "algebra"


@pytest.fixture(scope="module")
def outcome(pipeline_env, tiny_zoo):
    """The tiny zoo's three experts merged with a λ that beats the base, evaluated and registered."""
    upload_expert(tiny_zoo / "base", f"s3://{pipeline_env.bucket}/bases/{BASE}", settings=pipeline_env)
    for domain in PIPELINE_DOMAINS:
        store_expert(tiny_zoo, domain, pipeline_env, base=BASE)
    config = pipeline_config(tiny_zoo, base={"name": BASE}, params={"lambda": 0.2})
    return configured(merge_pipeline, config.runner, pipeline_env)(config)


def stored_keys(settings, uri: str) -> list[str]:
    location = S3Location.parse(uri)
    listing = s3_client(settings).list_objects_v2(Bucket=location.bucket, Prefix=f"{location.prefix}/")
    return sorted(item["Key"].removeprefix(f"{location.prefix}/") for item in listing.get("Contents", []))


def cli_ce(run_cli, target, tiny_zoo, tmp_path) -> float:
    """The CE that `mergeplan evaluate TARGET` reports for the first example of DOMAIN."""
    scores = tmp_path / "scores.json"
    status, _, err = run_cli("evaluate", target, "--data", tiny_zoo / "data", "--domains", DOMAIN,
                             "--max-examples", 1, "--accuracy-samples", 0, "--json", scores)
    assert status == 0, err
    return json.loads(scores.read_text())["domains"][0]["ce"]


def test_mlflow_loads_the_champion_from_the_merged_folder_and_scores_it_as_mergeplan_does(
        outcome, pipeline_env, tiny_zoo, run_cli, tmp_path):
    assert outcome.champion  # the config's merge beats the base: the first run is crowned
    uri = f"models:/{merged_model_name(BASE)}@{CHAMPION}"
    with mock.patch.dict(os.environ, mlflow_client_env(pipeline_env)):
        components = mlflow.transformers.load_model(uri, return_type="components")
        pyfunc_model = mlflow.pyfunc.load_model(uri, suppress_warnings=True)
    model, tokenizer = components["model"], components["tokenizer"]
    example = load_split(tiny_zoo / "data", DOMAIN, "eval")[:1]
    ce, _ = cross_entropy(model.eval(), tokenizer, example, 1, model.config.max_position_embeddings)
    assert ce == pytest.approx(cli_ce(run_cli, uri, tiny_zoo, tmp_path), abs=1e-6)
    assert ce == pytest.approx(cli_ce(run_cli, outcome.model_path, tiny_zoo, tmp_path), abs=1e-6)
    assert isinstance(pyfunc_model.predict(["Question: 1 + 1"])[0], str)

    client = MlflowClient(pipeline_env.mlflow_tracking_uri)
    version = client.get_model_version_by_alias(merged_model_name(BASE), CHAMPION)
    assert version.source == outcome.merged_uri
    keys = stored_keys(pipeline_env, outcome.merged_uri)
    weights = [key for key in keys if key.endswith(".safetensors")]
    assert weights == ["model.safetensors"]  # once, where the merge put it: MLmodel's model_binary is "."
    assert MLMODEL in keys and f"{TOKENIZER_FOLDER}/tokenizer.json" in keys
    assert set(read_manifest(outcome.merged_uri, settings=pipeline_env).files) == set(keys) - {"manifest.json"}
    run = client.get_run(outcome.run_id)
    run_prefix = f"mlflow/{run.info.artifact_uri.removeprefix('mlflow-artifacts:/')}"
    run_files = stored_keys(pipeline_env, f"s3://{pipeline_env.bucket}/{run_prefix}")
    assert run_files and not [key for key in run_files if key.endswith(".safetensors")]
    assert not (outcome.model_path / MLMODEL).exists()  # the cached merge is left as it was


def test_the_mlmodel_is_the_same_bytes_for_the_same_merge(outcome, pipeline_env):
    with tempfile.TemporaryDirectory() as staging:
        again = upload_expert(outcome.model_path, f"s3://{pipeline_env.bucket}/merged/{SCRATCH}/again",
                              settings=pipeline_env, extra_files=mlflow_model_files(outcome.model_path, staging))
        mlmodel = Model.load(os.path.join(staging, MLMODEL))
    assert again.sha256 == read_manifest(outcome.merged_uri, settings=pipeline_env).sha256
    assert mlmodel.flavors["transformers"]["model_binary"] == "."
    assert mlmodel.model_uuid is None and mlmodel.run_id is None


@pytest.fixture(scope="module")
def scratch_versions(outcome, pipeline_env) -> list[str]:
    """Two versions of merged.SCRATCH, each the merge uploaded to a folder of its own: champion -> 1, head -> 2."""
    versions = []
    for index in (1, 2):
        uri = f"s3://{pipeline_env.bucket}/merged/{SCRATCH}/v{index}"
        with tempfile.TemporaryDirectory() as staging:
            upload_expert(outcome.model_path, uri, settings=pipeline_env,
                          extra_files=mlflow_model_files(outcome.model_path, staging))
        versions.append(register_merged(SCRATCH, uri, None, f"scratch-{index}", {}, settings=pipeline_env))
    set_alias(SCRATCH, CHAMPION, versions[0], settings=pipeline_env)
    set_alias(SCRATCH, HEAD, versions[1], settings=pipeline_env)
    return versions


def one_error_line(run_cli, target, tiny_zoo) -> str:
    status, out, err = run_cli("evaluate", target, "--data", tiny_zoo / "data", "--max-examples", 1)
    assert status == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_an_alias_whose_version_was_deleted_is_named_with_the_aliases_that_exist(scratch_versions, pipeline_env,
                                                                                  tiny_zoo, run_cli):
    name = merged_model_name(SCRATCH)
    client = MlflowClient(pipeline_env.mlflow_tracking_uri)
    client.delete_model_version(name, scratch_versions[0])
    assert CHAMPION not in client.get_registered_model(name).aliases  # MLflow dropped the alias with the version
    err = one_error_line(run_cli, f"models:/{name}@{CHAMPION}", tiny_zoo)
    assert f"models:/{name}@{CHAMPION}" in err and f"no alias '{CHAMPION}'" in err
    assert f"@{HEAD} (version {scratch_versions[1]})" in err
    err = one_error_line(run_cli, f"models:/{name}/{scratch_versions[0]}", tiny_zoo)
    assert f"no version {scratch_versions[0]}" in err and f"newest version is {scratch_versions[1]}" in err
    err = one_error_line(run_cli, "models:/merged.never-registered@head", tiny_zoo)
    assert "no registered model merged.never-registered" in err


def test_a_version_whose_files_are_gone_from_s3_names_its_folder(scratch_versions, pipeline_env, tiny_zoo, run_cli):
    uri = f"s3://{pipeline_env.bucket}/merged/{SCRATCH}/v2"
    location = S3Location.parse(uri)
    s3 = s3_client(pipeline_env)
    for key in stored_keys(pipeline_env, uri):
        s3.delete_object(Bucket=location.bucket, Key=location.key(key))
    err = one_error_line(run_cli, f"models:/{merged_model_name(SCRATCH)}@{HEAD}", tiny_zoo)
    assert f"gone from {uri} " in err and "restore them" in err
    assert ACCESS_KEY not in err and SECRET_KEY not in err


def test_a_class_transformers_lacks_is_refused_rather_than_loaded_with_remote_code(zoo, tmp_path):
    folder = Path(shutil.copytree(zoo["base"], tmp_path / "custom"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architectures": ["MyOwnForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"architectures\[0\] 'MyOwnForCausalLM' is not a class of transformers"):
        mlflow_model_files(folder, tmp_path)
    assert not (tmp_path / MLMODEL).exists()
