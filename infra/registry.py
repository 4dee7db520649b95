"""MLflow Model Registry: each expert is a registered model `expert.BASE.DOMAIN` whose versions are its fine-tunes.

A version's source is the expert's S3 folder; its tags (domain, base, s3_uri, sha256 of the manifest) are what
the webhook receiver forwards to Prefect. Every function checks first that the server answers, so a pipeline
fails in seconds rather than after its heavy work (MLflow's own client retries for minutes).
"""

from __future__ import annotations

import logging
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from infra.errors import ExpertRefused, RegistryError, StorageError
from infra.s3 import S3Location, base_uri, read_json_file, read_manifest, s3_client
from infra.settings import Settings, redact_url, without_userinfo
from merging.experts import ADAPTER_CONFIG
from merging.io.checkpoint import STRUCTURAL_FIELDS

log = logging.getLogger("mergeplan")

WEBHOOK_NAME = "mergeplan-expert-registered"
WEBHOOK_EVENT = "model_version.created"
CHAMPION = "champion"
HEAD = "head"  # the merge of every expert taken so far, the one the next expert joins
MERGE_KEY = "merge_key"  # version tag of a merged model: the content key of its merge
# Dots separate the parts of `expert.BASE.DOMAIN` and of the Prefect resource id, so names may not have any.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class RegisteredExpert:
    """One registered version of an expert."""

    model_name: str
    version: str
    base: str
    domain: str
    s3_uri: str
    sha256: str


def latest_expert_versions(base: str, *, settings: Settings) -> list[tuple[RegisteredExpert, int]]:
    """The newest registered version of each `expert.BASE.DOMAIN` with its registration time (ms since the
    epoch), oldest registration first."""
    client = mlflow_client(settings)
    prefix = f"expert.{base}."
    try:
        latest = []
        for model in client.search_registered_models(filter_string=f"name LIKE '{prefix}%'", max_results=1000):
            versions = client.search_model_versions(f"name='{model.name}'", max_results=1000)
            newest = max(versions, key=lambda v: int(v.version))
            tags = newest.tags
            latest.append((RegisteredExpert(model.name, str(newest.version), base,
                                            tags.get("domain", model.name.removeprefix(prefix)), tags["s3_uri"],
                                            tags["sha256"]), int(newest.creation_timestamp)))
    except MlflowException as exc:
        raise refused(exc, f"listing the experts of {base}", settings) from exc
    return sorted(latest, key=lambda pair: (pair[1], pair[0].model_name))


@dataclass(frozen=True)
class Lineage:
    """What the registry knows of one merged expert: its registered version, found by the sha256 of its manifest
    (however the pipeline named it), or why none was."""

    model_name: str | None
    version: str | None
    unregistered_reason: str = ""


def expert_lineage(base: str, s3_uri: str, sha256: str, *, settings: Settings) -> Lineage:
    """The registered version of `expert.BASE.*` with manifest SHA256 (the one stored at S3_URI when the same
    files were registered more than once, else the newest)."""
    prefix = f"expert.{base}."
    try:
        found = mlflow_client(settings).search_model_versions(
            f"name LIKE '{prefix}%' and tags.sha256 = '{sha256}'", max_results=1000)
    except MlflowException as exc:
        raise refused(exc, f"looking up the expert {s3_uri}", settings) from exc
    found = [v for v in found if v.name.startswith(prefix)]  # LIKE reads '_' in BASE as a wildcard
    if not found:
        return Lineage(None, None, f"no version of {prefix}* has manifest sha256 {sha256[:16]}...; register it with "
                                   f"`mergeplan expert register {s3_uri} --domain DOMAIN --base {base}`")
    best = max(found, key=lambda v: (v.tags.get("s3_uri") == s3_uri, int(v.creation_timestamp), v.name))
    return Lineage(best.name, str(best.version))


def expert_model_name(base: str, domain: str) -> str:
    """The registered model of BASE's expert for DOMAIN."""
    for kind, value in (("base", base), ("domain", domain)):
        if not _NAME.match(value):
            raise RegistryError(f"{kind} name {value!r}: use letters, digits, '-' and '_' only (no dots)")
    return f"expert.{base}.{domain}"


def check_reachable(tracking_uri: str, timeout_s: float = 3.0) -> None:
    """Raise RegistryError within TIMEOUT_S unless the MLflow server at TRACKING_URI answers its health check."""
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return  # a local store (sqlite:, file:) has no server to wait for
    health = without_userinfo(tracking_uri).rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s):
            return
    except urllib.error.HTTPError as exc:
        reason = f"health check answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise RegistryError(f"MLflow at {redact_url(tracking_uri)} is unreachable ({reason}); start the local stack "
                        "with `mergeplan up` or set MERGEPLAN_MLFLOW_TRACKING_URI")


def mlflow_client(settings: Settings) -> MlflowClient:
    """A client of the configured server, once its health check answered (fail fast, not after minutes)."""
    check_reachable(settings.mlflow_tracking_uri, settings.mlflow_timeout_s)
    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)


def refused(exc: MlflowException, what: str, settings: Settings) -> RegistryError:
    """EXC as one line naming the server (without credentials) and what was refused."""
    first_line = exc.message.strip().splitlines()[0] if exc.message.strip() else exc.error_code
    return RegistryError(f"MLflow at {redact_url(settings.mlflow_tracking_uri)} refused {what}: {first_line}")


def check_same_base(s3_uri: str, base: str, *, settings: Settings, client=None) -> str:
    """Refuse an expert that is not a fine-tune of BASE (ExpertRefused): by the layout (experts/OTHER/...) or by
    its config.json differing from the base's in a structural field. Returns the sha256 of the expert's manifest.
    A store or server that cannot answer raises its own error, not a refusal: the expert may well be fine."""
    location = S3Location.parse(s3_uri)
    parts = location.prefix.split("/")
    if len(parts) == 3 and parts[0] == "experts" and parts[1] != base:
        raise ExpertRefused(f"{s3_uri}: lies under base {parts[1]!r}, not {base!r}; register it with --base "
                            f"{parts[1]} or upload it under s3://{location.bucket}/experts/{base}/")
    client = client or s3_client(settings)
    manifest = read_manifest(s3_uri, settings=settings, client=client)
    if ADAPTER_CONFIG in manifest.files:
        # An adapter has no model config: its factors' shapes are checked against the base's tensors when merged.
        adapter = read_json_file(s3_uri, ADAPTER_CONFIG, manifest, settings=settings, client=client)
        if adapter.get("peft_type") != "LORA":
            raise ExpertRefused(f"{s3_uri}/{ADAPTER_CONFIG}: peft_type is {adapter.get('peft_type')!r}; only LoRA "
                                "adapters (or full checkpoints) can be merged")
        return manifest.sha256
    config = read_json_file(s3_uri, "config.json", manifest, settings=settings, client=client)
    base_location = base_uri(base, settings)
    try:
        base_manifest = read_manifest(base_location, settings=settings, client=client)
    except StorageError as exc:
        raise RegistryError(f"base {base!r} is not in the store ({exc}); upload it with `mergeplan expert upload "
                            f"BASE_FOLDER {base_location}`") from exc
    base_config = read_json_file(base_location, "config.json", base_manifest, settings=settings, client=client)
    for field in STRUCTURAL_FIELDS:
        if config.get(field) != base_config.get(field):
            raise ExpertRefused(
                f"{s3_uri}/config.json: {field} is {config.get(field)!r}, the base {base} ({base_location}) has "
                f"{base_config.get(field)!r}; an expert must be a fine-tune of the pipeline's base")
    return manifest.sha256


def register_expert(s3_uri: str, domain: str, base: str, *, description: str | None = None,
                    settings: Settings | None = None, s3=None) -> RegisteredExpert:
    """Register the expert at S3_URI as a new version of `expert.BASE.DOMAIN` (the model is created if needed).

    The same content (same manifest sha256) registered again returns the existing version, so that a retried
    registration does not start the pipeline twice."""
    settings = settings or Settings.from_env()
    name = expert_model_name(base, domain)
    client = mlflow_client(settings)
    sha256 = check_same_base(s3_uri, base, settings=settings, client=s3)
    tags = {"domain": domain, "base": base, "s3_uri": S3Location.parse(s3_uri).uri(), "sha256": sha256}
    try:
        existing = client.search_model_versions(f"name='{name}' and tags.sha256='{sha256}'")
        if existing:
            log.info("%s: already registered as %s version %s", s3_uri, name, existing[0].version)
            return RegisteredExpert(name, str(existing[0].version), base, domain, tags["s3_uri"], sha256)
        try:
            client.create_registered_model(name, tags={"domain": domain, "base": base},
                                           description=f"Expert of {base} for {domain} (mergeplan)")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # An S3 source is ready at once: no need for MLflow's wait loop (and its log line).
        version = client.create_model_version(name, source=tags["s3_uri"], tags=tags, description=description,
                                              await_creation_for=0)
    except MlflowException as exc:
        raise refused(exc, f"registering {s3_uri} as {name}", settings) from exc
    log.info("registered %s as %s version %s", s3_uri, name, version.version)
    return RegisteredExpert(name, str(version.version), base, domain, tags["s3_uri"], sha256)


def ensure_webhook(url: str, secret: str, *, settings: Settings | None = None) -> str:
    """Make MLflow call URL, signed with SECRET, on every new model version: one webhook, created or updated."""
    settings = settings or Settings.from_env()
    client = mlflow_client(settings)
    try:
        mine = [hook for hook in client.list_webhooks(max_results=1000) if hook.name == WEBHOOK_NAME]
        for duplicate in mine[1:]:
            client.delete_webhook(duplicate.webhook_id)
        if mine:
            # MLflow never returns a webhook's secret, so it is always written again.
            hook = client.update_webhook(mine[0].webhook_id, url=url, events=[WEBHOOK_EVENT], secret=secret,
                                         status="ACTIVE")
        else:
            hook = client.create_webhook(WEBHOOK_NAME, url, events=[WEBHOOK_EVENT], secret=secret,
                                         description="mergeplan: new expert versions -> Prefect event")
    except MlflowException as exc:
        raise refused(exc, f"the webhook to {redact_url(url)}", settings) from exc
    return hook.webhook_id


def expert_version_tags(model_name: str, version: str, *, settings: Settings | None = None) -> dict[str, str]:
    """The tags of one registered version (the webhook receiver's fallback when a payload lacks them)."""
    settings = settings or Settings.from_env()
    client = mlflow_client(settings)
    try:
        return dict(client.get_model_version(model_name, version).tags)
    except MlflowException as exc:
        raise refused(exc, f"reading {model_name} version {version}", settings) from exc


def merged_model_name(base: str) -> str:
    """The registered model whose versions are BASE's merged models."""
    expert_model_name(base, "merged")  # the same naming rules
    return f"merged.{base}"


def aliased_version(base: str, alias: str, *, settings: Settings) -> ModelVersion | None:
    """The version of `merged.BASE` with ALIAS (`champion`, `head`), or None before the first one."""
    client = mlflow_client(settings)
    try:
        return client.get_model_version_by_alias(merged_model_name(base), alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise refused(exc, f"reading the {alias} of {merged_model_name(base)}", settings) from exc


def champion_version(base: str, *, settings: Settings) -> ModelVersion | None:
    """The best merge so far: alias `champion`."""
    return aliased_version(base, CHAMPION, settings=settings)


def head_version(base: str, *, settings: Settings) -> ModelVersion | None:
    """The merge the next expert joins: alias `head` (the champion in registries made before `head` existed)."""
    return aliased_version(base, HEAD, settings=settings) or champion_version(base, settings=settings)


def register_merged(base: str, s3_uri: str, run_id: str, merge_key: str, tags: dict[str, str], *,
                    settings: Settings) -> str:
    """A new version of `merged.BASE` whose source is the merged model's S3 folder (no copy into MLflow); the
    same merge (tag merge_key) registered again returns its existing version."""
    name = merged_model_name(base)
    tags = tags | {MERGE_KEY: merge_key}
    client = mlflow_client(settings)
    try:
        existing = client.search_model_versions(f"name='{name}' and tags.{MERGE_KEY}='{merge_key}'")
        if existing:
            return str(existing[0].version)
        try:
            client.create_registered_model(name, tags={"base": base},
                                           description=f"Merged models of {base} (mergeplan)")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(name, source=s3_uri, run_id=run_id, tags=tags, await_creation_for=0)
    except MlflowException as exc:
        raise refused(exc, f"registering {s3_uri} as {name}", settings) from exc
    log.info("registered %s as %s version %s", s3_uri, name, version.version)
    return str(version.version)


def describe_version(base: str, version: str, description: str, *, settings: Settings) -> None:
    """Set the description (markdown, shown on the version's page) of version VERSION of `merged.BASE`."""
    try:
        mlflow_client(settings).update_model_version(merged_model_name(base), version, description=description)
    except MlflowException as exc:
        raise refused(exc, f"describing {merged_model_name(base)} version {version}", settings) from exc


def set_alias(base: str, alias: str, version: str, *, settings: Settings) -> None:
    """Point ALIAS (`champion`, `head`) of `merged.BASE` at VERSION."""
    client = mlflow_client(settings)
    try:
        client.set_registered_model_alias(merged_model_name(base), alias, version)
    except MlflowException as exc:
        raise refused(exc, f"setting {merged_model_name(base)}@{alias}", settings) from exc
