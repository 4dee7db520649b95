"""Which experts a pipeline merges, and verified local copies of them, of the base and of the evaluation data.

`registered_experts` and `stored_experts` read only registry tags and manifests (no weights); `fetch_checkpoint`
downloads through the content-addressed cache of infra/cache.py and is cached by Prefect on the manifest's
sha256, so a second run neither downloads nor re-reads anything but the registry.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prefect import task
from pydantic import BaseModel, ConfigDict

from infra.cache import cached_folder
from infra.errors import RegistryError
from infra.registry import latest_expert_versions
from infra.s3 import S3Location, base_uri, download_folder, is_s3_uri, read_manifest
from infra.settings import Settings
from tasks.caching import RESULT_SERIALIZER, content_cache, content_hash, tree_hash
from tasks.retrying import IO_TASK_OPTIONS

log = logging.getLogger("mergeplan")


class CheckpointRef(BaseModel):
    """A folder in the store (or a local one): a checkpoint, or the evaluation data; identified by the sha256 of its
    manifest (of its files, for a local folder)."""

    model_config = ConfigDict(frozen=True)
    name: str
    domain: str
    uri: str  # s3://... or a local folder
    sha256: str
    version: str | None = None  # its registered version, for experts from the registry

    @property
    def cache_key(self) -> str:
        # A local folder's "copy" is the folder itself: the same content elsewhere is another result.
        return self.sha256 if is_s3_uri(self.uri) else content_hash([self.uri, self.sha256])

    @property
    def output(self) -> Path | None:
        """The cache folder the download lands in (for content_cache); None for a local folder."""
        return cached_folder(Settings.from_env().cache_dir, self.sha256) if is_s3_uri(self.uri) else None


class LocalCheckpoint(BaseModel):
    model_config = ConfigDict(frozen=True)
    ref: CheckpointRef
    path: Path


def folder_ref(name: str, domain: str, where: str | Path, settings: Settings) -> CheckpointRef:
    """A folder to fetch: a local one (hashed here) or one in the store (its manifest read)."""
    if not is_s3_uri(where):
        return CheckpointRef(name=name, domain=domain, uri=str(where), sha256=tree_hash(Path(where)))
    return CheckpointRef(name=name, domain=domain, uri=str(where),
                         sha256=read_manifest(str(where), settings=settings).sha256)


def base_ref(name: str, uri: str | None, path: Path | None, settings: Settings) -> CheckpointRef:
    """The base: a local folder, or a store folder (by default s3://BUCKET/bases/NAME)."""
    return folder_ref(name, "base", path if path is not None else uri or base_uri(name, settings), settings)


def data_ref(where: str | Path, settings: Settings) -> CheckpointRef:
    """The evaluation data: a local folder, or a store folder (s3://BUCKET/data)."""
    return folder_ref("data", "data", where, settings)


def registered_experts(base: str, settings: Settings) -> list[CheckpointRef]:
    """The newest registered version of each `expert.BASE.DOMAIN`, in domain order."""
    experts = sorted((expert for expert, _ in latest_expert_versions(base, settings=settings)),
                     key=lambda expert: expert.model_name)
    if not experts:
        raise RegistryError(f"no expert of base {base!r} is registered; register some with `mergeplan expert "
                            "register S3_URI --domain D --base BASE`, or list S3 URIs under experts:")
    return [CheckpointRef(name=e.domain, domain=e.domain, uri=e.s3_uri, sha256=e.sha256, version=e.version)
            for e in experts]


def merged_experts(version) -> list[CheckpointRef]:
    """The experts a registered merged version (of `merged.BASE`) holds, from its `experts` tag."""
    return [CheckpointRef.model_validate(e) for e in json.loads(version.tags.get("experts", "[]"))]


def stored_experts(uris: list[str], settings: Settings) -> list[CheckpointRef]:
    """Experts named by S3 URI: their manifests give the sha256; the folder name is the expert's name."""
    refs = []
    for uri in uris:
        name = S3Location.parse(uri).prefix.rsplit("/", 1)[-1]
        refs.append(CheckpointRef(name=name, domain=name, uri=uri, sha256=read_manifest(uri, settings=settings).sha256))
    return refs


@task(name="fetch-checkpoint", **IO_TASK_OPTIONS, cache_policy=content_cache(),
      persist_result=True, result_serializer=RESULT_SERIALIZER, task_run_name="fetch {ref.name}")
def fetch_checkpoint(ref: CheckpointRef) -> LocalCheckpoint:
    """A verified local copy (only files not yet in the cache are downloaded)."""
    return local_copy(ref)


def local_copy(ref: CheckpointRef) -> LocalCheckpoint:
    """REF in this machine's cache (downloaded when missing): how a task on any worker gets its inputs from S3."""
    if not is_s3_uri(ref.uri):
        return LocalCheckpoint(ref=ref, path=Path(ref.uri))
    path = download_folder(ref.uri, settings=Settings.from_env())
    if path.name != ref.sha256:
        raise RegistryError(f"{ref.uri}: its manifest changed since it was registered (sha256 {path.name[:12]}... "
                            f"not {ref.sha256[:12]}...); register the new upload as a new version")
    return LocalCheckpoint(ref=ref, path=path)
