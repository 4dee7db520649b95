"""S3 store: checkpoint folders under s3://BUCKET/experts/BASE/NAME/ (and the bases under s3://BUCKET/bases/BASE/),
evaluation data under s3://BUCKET/data/ (DOMAIN/{eval,calib}.jsonl), each folder with a manifest.json
(infra/manifest.py), written last. Requests are retried while the endpoint is unreachable or overloaded; downloads
land, verified, in the content-addressed cache of infra/cache.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError

from infra.cache import FolderCache, collect_garbage, hold_folder
from infra.errors import StorageError
from infra.manifest import MANIFEST, Manifest, ManifestEntry, folder_files, manifest_of, parse_manifest
from infra.settings import Settings
from merging.data.loading import data_domains
from merging.experts import open_expert
from merging.io.hashing import sha256_file
from merging.progress_bar import progress_bar

log = logging.getLogger("mergeplan")

_MAX_BACKOFF_S = 30
# Server-side failures that a later attempt may not meet; every other S3 error is final.
_RETRYABLE_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                    "Throttling", "ThrottlingException"}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_DENIED_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
T = TypeVar("T")


def is_s3_uri(where: str | Path) -> bool:
    """Whether WHERE names a folder in the store (s3://...) rather than a local one."""
    return str(where).startswith("s3://")


@dataclass(frozen=True)
class S3Location:
    """A folder in a bucket: s3://BUCKET/PREFIX (no trailing slash)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        if not is_s3_uri(uri):
            raise StorageError(f"{uri}: not an S3 URI; write s3://BUCKET/experts/BASE/NAME")
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        prefix = prefix.strip("/")
        if not bucket or not prefix:
            raise StorageError(f"{uri}: needs a bucket and a folder, as in s3://BUCKET/experts/BASE/NAME")
        return cls(bucket, prefix)

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def uri(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(name) if name else self.prefix}"


def expert_uri(base: str, name: str, settings: Settings) -> str:
    """Where the layout keeps expert NAME of BASE."""
    return f"s3://{settings.bucket}/experts/{base}/{name}"


def base_uri(base: str, settings: Settings) -> str:
    """Where the layout keeps the base checkpoint BASE itself (its experts are checked against its config)."""
    return f"s3://{settings.bucket}/bases/{base}"


def data_uri(settings: Settings) -> str:
    """Where the layout keeps the evaluation and calibration data (one subfolder per domain)."""
    return f"s3://{settings.bucket}/data"


def s3_client(settings: Settings):
    """A boto3 S3 client for the configured endpoint; retries are ours (with_retries), so botocore makes one try."""
    config = Config(retries={"mode": "standard", "total_max_attempts": 1},
                    connect_timeout=settings.s3_connect_timeout_s, read_timeout=60,
                    max_pool_connections=settings.transfer_threads ** 2)
    return boto3.session.Session().client("s3", config=config, **settings.s3_client_kwargs())


def with_retries(call: Callable[[], T], what: str, settings: Settings) -> T:
    """CALL, retried with exponential backoff while the endpoint is unreachable or overloaded; else one StorageError.

    WHAT names the object for messages, e.g. 's3://b/k'."""
    failure = Exception("no attempt made")
    for attempt in range(1, settings.s3_attempts + 1):
        try:
            return call()
        except (BotoConnectionError, HTTPClientError, RetriesExceededError) as exc:
            failure = exc
        except ClientError as exc:
            if _error_code(exc) not in _RETRYABLE_CODES:
                raise _storage_error(exc, what, settings) from exc
            failure = exc
        except NoCredentialsError as exc:
            raise StorageError(f"{what}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                               "or an AWS profile") from exc
        if attempt < settings.s3_attempts:
            wait = min(_MAX_BACKOFF_S, settings.s3_backoff_s * 2 ** (attempt - 1))
            log.warning("%s: %s (attempt %d of %d), retrying in %.2g s", what, _describe(failure), attempt,
                        settings.s3_attempts, wait)
            time.sleep(wait)
    raise StorageError(f"S3 endpoint {settings.s3_endpoint_name} failed {settings.s3_attempts} times for {what} "
                       f"({_describe(failure)}); check MERGEPLAN_S3_ENDPOINT and that the store is up "
                       "(`mergeplan up` starts the local one)") from failure


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _describe(exc: Exception) -> str:
    if isinstance(exc, RetriesExceededError):
        exc = exc.last_exception
    return str(exc) or type(exc).__name__


def _storage_error(exc: ClientError, what: str, settings: Settings) -> StorageError:
    code = _error_code(exc)
    if code in _MISSING_CODES:
        return StorageError(f"{what}: no such object at {settings.s3_endpoint_name}; upload it first "
                            "(`mergeplan expert upload FOLDER S3_URI` for a checkpoint, `mergeplan data upload "
                            "FOLDER S3_URI` for data)")
    if code == "NoSuchBucket":
        return StorageError(f"{what}: the bucket does not exist at {settings.s3_endpoint_name}; create it, or set "
                            "MERGEPLAN_BUCKET (`mergeplan up` creates the local one)")
    if code in _DENIED_CODES:
        return StorageError(f"{what}: access denied by {settings.s3_endpoint_name} ({code}); check the AWS "
                            "credentials and the bucket policy")
    return StorageError(f"{what}: S3 error {code} from {settings.s3_endpoint_name}")


def ensure_bucket(settings: Settings, client=None) -> None:
    """Create the configured bucket unless this account has it already."""
    client = client or s3_client(settings)
    location = {} if settings.aws_region == "us-east-1" else {
        "CreateBucketConfiguration": {"LocationConstraint": settings.aws_region}}

    def create() -> None:
        try:
            client.create_bucket(Bucket=settings.bucket, **location)
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                raise

    with_retries(create, f"s3://{settings.bucket}", settings)


READY_PROBE_KEY = ".mergeplan/ready"


def wait_until_serving(settings: Settings, timeout_s: float, client=None) -> None:
    """Wait until the store writes and reads back an object: a restarted SeaweedFS answers its health check
    before its volumes are registered, and fails reads of stored objects (InternalError) until they are."""
    client = client or s3_client(settings)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.put_object(Bucket=settings.bucket, Key=READY_PROBE_KEY, Body=b"ready")
            client.get_object(Bucket=settings.bucket, Key=READY_PROBE_KEY)["Body"].read()
            return
        except (BotoConnectionError, HTTPClientError, ClientError) as exc:
            if time.monotonic() > deadline:
                raise StorageError(f"S3 endpoint {settings.s3_endpoint_name} is up but did not serve "
                                   f"s3://{settings.bucket}/{READY_PROBE_KEY} within {timeout_s:.0f} s "
                                   f"({_describe(exc)}); see its log") from exc
            time.sleep(0.1)


def _transfer_config(settings: Settings) -> TransferConfig:
    chunk = settings.multipart_chunk_mb * 2**20
    return TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk,
                          max_concurrency=settings.transfer_threads)


def upload_expert(folder: str | Path, s3_uri: str, *, settings: Settings | None = None, client=None,
                  extra_files: Mapping[str, Path] | None = None) -> Manifest:
    """Upload a checkpoint or LoRA adapter folder (a base or an expert; checked to be one) to S3_URI, with
    EXTRA_FILES as upload_folder takes them."""
    open_expert(folder)
    return upload_folder(folder, s3_uri, settings=settings, client=client, extra_files=extra_files)


def upload_data(folder: str | Path, s3_uri: str, *, settings: Settings | None = None, client=None) -> Manifest:
    """Upload a data folder (DOMAIN/{eval,calib}.jsonl; checked to have domains) to S3_URI."""
    data_domains(folder)
    return upload_folder(folder, s3_uri, settings=settings, client=client)


def upload_folder(folder: str | Path, s3_uri: str, *, settings: Settings | None = None, client=None,
                  extra_files: Mapping[str, Path] | None = None) -> Manifest:
    """Upload every file of FOLDER to S3_URI (in parallel, multipart), then its manifest.json. EXTRA_FILES (stored
    name -> local file) are stored and listed with them, without being copied into FOLDER."""
    settings = settings or Settings.from_env()
    client = client or s3_client(settings)
    location, folder = S3Location.parse(s3_uri), Path(folder)
    files = folder_files(folder)
    for name in sorted(extra_files or {}):  # appended after FOLDER's own: without extras the manifest is unchanged
        files[name] = Path(extra_files[name])
    manifest = manifest_of(files)
    transfer = _transfer_config(settings)

    def upload(name: str) -> None:
        with_retries(lambda: client.upload_file(str(files[name]), location.bucket, location.key(name),
                                                Config=transfer), location.uri(name), settings)

    started = time.perf_counter()
    with ThreadPoolExecutor(settings.transfer_threads) as pool:
        list(pool.map(upload, files))
    with_retries(lambda: client.put_object(Bucket=location.bucket, Key=location.key(MANIFEST), Body=manifest.raw,
                                           ContentType="application/json"), location.uri(MANIFEST), settings)
    log.info("uploaded %d files (%.1f MB) to %s in %.1f s", len(files),
             sum(e.size for e in manifest.files.values()) / 1e6, location.uri(), time.perf_counter() - started)
    return manifest


def _get_bytes(client, location: S3Location, name: str, settings: Settings) -> bytes:
    def get() -> bytes:
        return client.get_object(Bucket=location.bucket, Key=location.key(name))["Body"].read()

    return with_retries(get, location.uri(name), settings)


def read_manifest(s3_uri: str, *, settings: Settings | None = None, client=None) -> Manifest:
    """The manifest of the expert at S3_URI, validated: safe relative names, sha256 and size for each, no pickles."""
    settings = settings or Settings.from_env()
    client = client or s3_client(settings)
    location = S3Location.parse(s3_uri)
    return parse_manifest(_get_bytes(client, location, MANIFEST, settings), location.uri(MANIFEST))


def read_json_file(s3_uri: str, name: str, manifest: Manifest, *, settings: Settings | None = None,
                   client=None) -> dict:
    """A small JSON file of the expert (config.json), checked against its manifest entry without the cache."""
    settings = settings or Settings.from_env()
    client = client or s3_client(settings)
    location = S3Location.parse(s3_uri)
    if name not in manifest.files:
        raise StorageError(f"{location.uri(MANIFEST)}: lists no {name}; is this a checkpoint folder?")
    raw = _get_bytes(client, location, name, settings)
    if hashlib.sha256(raw).hexdigest() != manifest.files[name].sha256:
        raise StorageError(f"{location.uri(name)}: sha256 differs from the manifest's; re-upload it")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StorageError(f"{location.uri(name)}: not JSON ({exc})") from exc


def _fetch_blob(client, location: S3Location, name: str, entry: ManifestEntry, cache: FolderCache,
                settings: Settings) -> int:
    """Download one file into the cache, verified; returns the bytes fetched (0 when another process had it)."""
    with cache.lock(entry.sha256):
        if cache.has_blob(entry):
            return 0
        partial = cache.partial(entry.sha256)
        try:
            with_retries(lambda: client.download_file(location.bucket, location.key(name), str(partial),
                                                      Config=_transfer_config(settings)),
                         location.uri(name), settings)
            actual = sha256_file(partial)
            if actual != entry.sha256:
                raise StorageError(f"{location.uri(name)}: sha256 {actual[:12]}... differs from the manifest's "
                                   f"{entry.sha256[:12]}...; the download was deleted; re-upload it")
            partial.chmod(0o444)  # blobs are shared through hard links: nobody may edit one in place
            os.replace(partial, cache.blob(entry.sha256))
        finally:  # ours, and any a killed download left: a partial file is never used, only deleted
            cache.remove_partials(entry.sha256)
    return entry.size


def download_folder(s3_uri: str, cache_dir: str | Path | None = None, *, settings: Settings | None = None,
                    client=None) -> Path:
    """The folder at S3_URI (an expert, a base or data) as a local folder in the cache; only files not yet cached
    are fetched, in parallel (multipart each), each verified against the manifest's sha256."""
    settings = settings or Settings.from_env()
    client = client or s3_client(settings)
    location = S3Location.parse(s3_uri)
    cache = FolderCache(Path(cache_dir) if cache_dir else settings.cache_dir)
    manifest = read_manifest(s3_uri, settings=settings, client=client)
    with cache.downloading():
        if cache.folder(manifest.sha256).is_dir():
            log.info("%s: in the cache (%s), nothing downloaded", location.uri(), cache.folder(manifest.sha256))
            hold_folder(cache.folder(manifest.sha256))
            return cache.folder(manifest.sha256)
        wanted: dict[str, str] = {}  # sha256 -> one file name that has it: identical files are fetched once
        for name, entry in manifest.files.items():
            if not cache.has_blob(entry):
                wanted.setdefault(entry.sha256, name)
        started = time.perf_counter()
        with ThreadPoolExecutor(settings.transfer_threads) as pool:
            fetched = sum(progress_bar(pool.map(lambda name: _fetch_blob(client, location, name, manifest.files[name],
                                                                         cache, settings), wanted.values()),
                                       f"download {location.uri()}", "file", total=len(wanted)))
        if wanted:
            log.info("downloaded %d files (%.1f MB) of %s in %.1f s", len(wanted), fetched / 1e6, location.uri(),
                     time.perf_counter() - started)
        folder = cache.assemble(manifest)
        hold_folder(cache.folder(manifest.sha256))
    if wanted:  # the limit is checked only when the cache grew
        collect_garbage(cache.root, int(settings.cache_max_gb * 1e9))
    return folder


def list_experts(base: str, *, settings: Settings | None = None, client=None) -> list[str]:
    """The S3 URIs of BASE's complete experts (those with a manifest) under s3://BUCKET/experts/BASE/."""
    settings = settings or Settings.from_env()
    client = client or s3_client(settings)
    prefix = f"experts/{base}/"

    def keys() -> list[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    names = []
    for key in with_retries(keys, f"s3://{settings.bucket}/{prefix}", settings):
        name, _, rest = key.removeprefix(prefix).partition("/")
        if rest == MANIFEST:
            names.append(name)
    return [expert_uri(base, name, settings) for name in sorted(names)]
