"""Which experts a pipeline merges, and verified local copies of them and of the base.

`resolve_experts` reads only manifests and registry tags (no weights); `fetch_checkpoint` downloads through the
content-addressed cache of tasks/storage.py and is cached by Prefect on the manifest's sha256, so a second run
neither downloads nor re-reads anything but the registry.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mlflow.exceptions import MlflowException
from prefect import task
from pydantic import BaseModel, ConfigDict

from infra.settings import Settings
from merging.errors import RegistryError
from tasks.caching import RESULT_SERIALIZER, content_cache, tree_hash
from tasks.registry import mlflow_client, refused
from tasks.storage import S3Location, base_uri, download_expert, read_manifest

log = logging.getLogger("mergeplan")
IO_RETRIES = 2


class CheckpointRef(BaseModel):
    """A checkpoint in the store (or a local folder), identified by the sha256 of its manifest."""

    model_config = ConfigDict(frozen=True)
    name: str
    domain: str
    uri: str  # s3://... or a local folder
    sha256: str
    version: str | None = None  # its registered version, for experts from the registry

    @property
    def cache_key(self) -> str:
        return self.sha256

    @property
    def output(self) -> Path | None:
        """The cache folder the download lands in (for content_cache); None for a local folder."""
        return Settings.from_env().cache_dir / "experts" / self.sha256 if self.uri.startswith("s3://") else None


class LocalCheckpoint(BaseModel):
    model_config = ConfigDict(frozen=True)
    ref: CheckpointRef
    path: Path


def base_ref(name: str, uri: str | None, path: Path | None, settings: Settings) -> CheckpointRef:
    """The base: a local folder (hashed here) or a store folder (its manifest read)."""
    if path is not None:
        return CheckpointRef(name=name, domain="base", uri=str(path), sha256=tree_hash(path))
    uri = uri or base_uri(name, settings)
    return CheckpointRef(name=name, domain="base", uri=uri, sha256=read_manifest(uri, settings=settings).sha256)


def registered_experts(base: str, settings: Settings) -> list[CheckpointRef]:
    """The newest registered version of each `expert.BASE.DOMAIN`, in domain order."""
    client = mlflow_client(settings)
    prefix = f"expert.{base}."
    try:
        models = client.search_registered_models(filter_string=f"name LIKE '{prefix}%'", max_results=1000)
        experts = []
        for model in sorted(models, key=lambda m: m.name):
            versions = client.search_model_versions(f"name='{model.name}'", max_results=1000)
            latest = max(versions, key=lambda v: int(v.version))
            tags = latest.tags
            domain = tags.get("domain", model.name.removeprefix(prefix))
            experts.append(CheckpointRef(name=domain, domain=domain, uri=tags["s3_uri"], sha256=tags["sha256"],
                                         version=str(latest.version)))
    except MlflowException as exc:
        raise refused(exc, f"listing the experts of {base}", settings) from exc
    if not experts:
        raise RegistryError(f"no expert of base {base!r} is registered; register some with `mergeplan expert "
                            "register S3_URI --domain D --base BASE`, or list S3 URIs under experts:")
    return experts


def stored_experts(uris: list[str], settings: Settings) -> list[CheckpointRef]:
    """Experts named by S3 URI: their manifests give the sha256; the folder name is the expert's name."""
    refs = []
    for uri in uris:
        name = S3Location.parse(uri).prefix.rsplit("/", 1)[-1]
        refs.append(CheckpointRef(name=name, domain=name, uri=uri, sha256=read_manifest(uri, settings=settings).sha256))
    return refs


@task(name="fetch-checkpoint", retries=IO_RETRIES, retry_delay_seconds=2, cache_policy=content_cache(),
      persist_result=True, result_serializer=RESULT_SERIALIZER, task_run_name="fetch {ref.name}")
def fetch_checkpoint(ref: CheckpointRef) -> LocalCheckpoint:
    """A verified local copy (only files not yet in the cache are downloaded)."""
    return local_copy(ref)


def local_copy(ref: CheckpointRef) -> LocalCheckpoint:
    """REF in this machine's cache (downloaded when missing): how a task on any worker gets its inputs from S3."""
    if not ref.uri.startswith("s3://"):
        return LocalCheckpoint(ref=ref, path=Path(ref.uri))
    path = download_expert(ref.uri, settings=Settings.from_env())
    if path.name != ref.sha256:
        raise RegistryError(f"{ref.uri}: its manifest changed since it was registered (sha256 {path.name[:12]}... "
                            f"not {ref.sha256[:12]}...); register the new upload as a new version")
    return LocalCheckpoint(ref=ref, path=path)
