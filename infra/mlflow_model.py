"""A merged model's S3 folder as an MLflow model, in place, and a registered version as a local folder.

The merged folder (config.json, safetensors, tokenizer files, merge_config.yaml, manifest.json) gets two more
things when it is uploaded: an `MLmodel` file with a `transformers` flavor (model_binary "." : the weights are
read where they are, never copied) and a `python_function` flavor, and copies of the small tokenizer files under
components/tokenizer/, where MLflow's loader reads them. So `mlflow.transformers.load_model` and
`mlflow.pyfunc.load_model` load `models:/merged.BASE@champion` directly. The MLmodel is a function of the folder's
files alone (no time, uuid or run id in it): the same merge gives the same manifest, whose sha256 is its identity.

`fetch_registered` goes the other way for `mergeplan evaluate models:/...`: the version's S3 folder, verified
against its manifest, in the download cache.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from infra.errors import RegistryError, StorageError
from infra.manifest import MANIFEST
from infra.registry import mlflow_client, refused
from infra.s3 import S3Location, download_folder, is_s3_uri, read_manifest, s3_client, with_retries
from infra.settings import AWS_ENV, Settings, redact_url
from merging.errors import CheckpointError
from merging.io.checkpoint import COMPANION_FILES
from merging.io.hf_loading import load_tokenizer

log = logging.getLogger("mergeplan")

MLMODEL = "MLmodel"
TOKENIZER_FOLDER = "components/tokenizer"  # where mlflow.transformers loads the tokenizer component from
TOKENIZER_FILES = tuple(name for name in COMPANION_FILES if name != "generation_config.json")
TASK, PIPELINE = "text-generation", "TextGenerationPipeline"
MODEL_URI_PREFIX = "models:/"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>[0-9]+))$")


def _transformers_class(name: object, what: str, where: Path) -> str:
    """NAME, when transformers itself has that class: anything else MLflow would load with trust_remote_code."""
    if not isinstance(name, str) or not hasattr(transformers, name):
        raise CheckpointError(f"{where}: {what} {name!r} is not a class of transformers {transformers.__version__}; "
                              "MLflow would load it only with trust_remote_code, which mergeplan never uses; merge "
                              "experts of a base whose classes transformers has")
    return name


def _tokenizer_class(folder: Path) -> str:
    """The class AutoTokenizer loads FOLDER's tokenizer as: what mergeplan evaluates with, so MLflow loads the same."""
    try:
        return type(load_tokenizer(folder)).__name__
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{folder}: its tokenizer does not load ({reason}); a merged model needs its base's "
                              "tokenizer files beside it") from exc


def mlmodel_content(folder: Path) -> dict:
    """The MLmodel of the merged model in FOLDER: a transformers text-generation flavor reading the weights in
    place, and the python_function flavor that loads through it."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: cannot be read as JSON ({exc}); is {folder} a model folder?") from exc
    architectures = config.get("architectures") or [None]
    flavor = {
        "task": TASK,
        "instance_type": PIPELINE,
        "pipeline_model_type": _transformers_class(architectures[0], "architectures[0]", config_path),
        "model_binary": ".",
        "components": ["tokenizer"],
        "tokenizer_type": _transformers_class(_tokenizer_class(folder), "tokenizer class", folder),
        # The version that wrote the checkpoint, not the one installed: the file depends on the folder alone.
        "transformers_version": config.get("transformers_version") or transformers.__version__,
    }
    dtype = config.get("dtype") or config.get("torch_dtype")
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        flavor["torch_dtype"] = f"torch.{dtype}"
    return {"flavors": {"transformers": flavor, "python_function": {"loader_module": "mlflow.transformers"}}}


def mlflow_model_files(folder: str | Path, staging: str | Path) -> dict[str, Path]:
    """What makes the merged model in FOLDER an MLflow model, by stored name: MLmodel (written into STAGING, so that
    FOLDER, a cached job output, is never changed) and FOLDER's own tokenizer files under components/tokenizer/."""
    folder, staging = Path(folder), Path(staging)
    mlmodel = staging / MLMODEL
    mlmodel.write_text(yaml.safe_dump(mlmodel_content(folder), sort_keys=True, default_flow_style=False))
    files = {MLMODEL: mlmodel}
    files |= {f"{TOKENIZER_FOLDER}/{name}": folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}
    return files


def mlflow_client_env(settings: Settings) -> dict[str, str]:
    """The environment an MLflow client needs to load a registered merge itself: the registry, and the store's
    endpoint and keys (boto3 reads them there; the values are secrets: never log this)."""
    kwargs = settings.s3_client_kwargs()
    env = {"MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri, "AWS_DEFAULT_REGION": settings.aws_region}
    env |= {AWS_ENV[field]: kwargs[field] for field in AWS_ENV if field in kwargs}
    if settings.s3_endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint
    return env


@dataclass(frozen=True)
class RegisteredFolder:
    """A registered version and its local copy."""

    name: str
    version: str
    source: str
    path: Path

    @property
    def uri(self) -> str:
        """The version's own URI: an alias may move, this does not."""
        return f"{MODEL_URI_PREFIX}{self.name}/{self.version}"


def registered_version(model_uri: str, settings: Settings) -> ModelVersion:
    """The version MODEL_URI (models:/NAME@ALIAS or models:/NAME/VERSION) names, or one RegistryError saying why
    there is none."""
    match = _MODEL_URI.match(model_uri)
    if match is None:
        raise RegistryError(f"{model_uri}: not a registered model version; write models:/merged.BASE@ALIAS (e.g. "
                            "@champion, @head) or models:/merged.BASE/VERSION")
    name, alias, version = match["name"], match["alias"], match["version"]
    client = mlflow_client(settings)
    server = redact_url(settings.mlflow_tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise refused(exc, f"reading {name}", settings) from exc
        raise RegistryError(f"{model_uri}: no registered model {name} at {server}; a pipeline run "
                            "(`mergeplan run PIPELINE.yaml`) registers merged.BASE") from exc
    if alias is not None:
        if alias not in model.aliases:
            # Deleting a version deletes the aliases that pointed at it: a missing alias may be a deleted version.
            others = ", ".join(f"@{a} (version {v})" for a, v in sorted(model.aliases.items())) or "none"
            raise RegistryError(f"{model_uri}: {name} has no alias {alias!r} at {server} (deleting a version "
                                f"deletes its aliases); its aliases: {others}; load one of them or a version, "
                                f"models:/{name}/VERSION")
        version = str(model.aliases[alias])
    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise refused(exc, f"reading {model_uri}", settings) from exc
        newest = max((int(v.version) for v in client.search_model_versions(f"name='{name}'")), default=None)
        have = "it has no versions" if newest is None else f"its newest version is {newest}"
        raise RegistryError(f"{model_uri}: {name} has no version {version} at {server} (deleted, or not yet "
                            f"registered); {have}") from exc


def _check_stored(model_uri: str, version: ModelVersion, settings: Settings) -> None:
    """Refuse, naming the S3 folder, a version whose files are gone from the store, in one listing."""
    location = S3Location.parse(version.source)
    client = s3_client(settings)
    prefix = f"{location.prefix}/"

    def keys() -> set[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=prefix)
        return {item["Key"].removeprefix(prefix) for page in pages for item in page.get("Contents", [])}

    stored = with_retries(keys, location.uri(), settings)
    what = f"{model_uri} ({version.name} version {version.version})"
    if MANIFEST not in stored:
        raise StorageError(f"{what}: its files are gone from {location.uri()} (no {MANIFEST}); restore them there, "
                           f"or load another version of {version.name}")
    missing = sorted(set(read_manifest(location.uri(), settings=settings, client=client).files) - stored)
    if missing:
        named = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise StorageError(f"{what}: {len(missing)} of its files are gone from {location.uri()} ({named}); restore "
                           f"them there, or load another version of {version.name}")


def fetch_registered(model_uri: str, settings: Settings | None = None) -> RegisteredFolder:
    """The version MODEL_URI names, as a local folder: its S3 folder downloaded into the content cache (verified
    against its manifest; what the cache has is not fetched again)."""
    settings = settings or Settings.from_env()
    version = registered_version(model_uri, settings)
    if not is_s3_uri(version.source):
        raise RegistryError(f"{model_uri}: version {version.version} of {version.name} is stored at "
                            f"{redact_url(version.source)}, not in S3; mergeplan reads registered models from S3 "
                            "folders with a manifest.json")
    _check_stored(model_uri, version, settings)
    path = download_folder(version.source, settings=settings)
    log.info("%s: %s version %s from %s", model_uri, version.name, version.version, version.source)
    return RegisteredFolder(version.name, str(version.version), version.source, path)
