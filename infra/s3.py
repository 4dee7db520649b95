"""S3 store: checkpoint folders under s3://BUCKET/experts/BASE/NAME/ (and the bases under s3://BUCKET/bases/BASE/),
evaluation data under s3://BUCKET/data/ (DOMAIN/{eval,calib}.jsonl), each folder with a manifest.json.

The manifest maps every file of the folder to {sha256, size}; it is written last, so a folder whose manifest
exists is complete. Downloads land in a content-addressed cache:

    CACHE/blobs/SHA256          verified file contents, read-only, shared by every folder that has the file
    CACHE/partial/SHA256.part*  downloads in progress; never read, deleted by the next download of that blob
    CACHE/folders/MANIFEST_SHA  one folder per stored version: hard links to the blobs + manifest.json
    CACHE/folders/.hold-SHA     a flock file that a process using the folder keeps share-locked until it exits
    CACHE/locks/                flock files, so that processes sharing a cache fetch each blob once

A folder appears by an atomic rename once every blob is verified, so a folder in folders/ is always complete,
and a second download of the same manifest fetches nothing but the manifest. The cache has a size limit
(Settings.cache_max_gb): collect_garbage removes least recently used folders (mtime, set on each use) and the
blobs only they linked, never a held folder and never while a download runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from s3transfer.exceptions import RetriesExceededError

from infra.settings import Settings
from merging.data.loading import data_domains
from merging.errors import CheckpointError, StorageError
from merging.experts import open_expert
from merging.io.checkpoint import PICKLE_SUFFIXES
from merging.io.hashing import sha256_file
from merging.progress_bar import progress_bar

log = logging.getLogger("mergeplan")

MANIFEST = "manifest.json"
_MAX_BACKOFF_S = 30
# Server-side failures that a later attempt may not meet; every other S3 error is final.
_RETRYABLE_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                    "Throttling", "ThrottlingException"}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_DENIED_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
T = TypeVar("T")


class ManifestEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


_MANIFEST_FILES = TypeAdapter(dict[str, ManifestEntry])


@dataclass(frozen=True)
class Manifest:
    """A stored folder's file list; sha256 is the hash of the manifest's own bytes, which identifies the version."""

    files: dict[str, ManifestEntry]
    sha256: str
    raw: bytes = field(repr=False)


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


def _folder_files(folder: Path) -> dict[str, Path]:
    """The folder's files by their relative POSIX name; refuses pickles."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        # Dot files are tool state (.cache/huggingface, .DS_Store), not part of the checkpoint.
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: pickle file; mergeplan never stores or loads pickles (they can run "
                                  "code); remove it or convert to safetensors")
        files[relative.as_posix()] = path
    return files


def upload_expert(folder: str | Path, s3_uri: str, *, settings: Settings | None = None, client=None) -> Manifest:
    """Upload a checkpoint or LoRA adapter folder (a base or an expert; checked to be one) to S3_URI."""
    open_expert(folder)
    return upload_folder(folder, s3_uri, settings=settings, client=client)


def upload_data(folder: str | Path, s3_uri: str, *, settings: Settings | None = None, client=None) -> Manifest:
    """Upload a data folder (DOMAIN/{eval,calib}.jsonl; checked to have domains) to S3_URI."""
    data_domains(folder)
    return upload_folder(folder, s3_uri, settings=settings, client=client)


def upload_folder(folder: str | Path, s3_uri: str, *, settings: Settings | None = None, client=None) -> Manifest:
    """Upload every file of FOLDER to S3_URI (in parallel, multipart), then its manifest.json."""
    settings = settings or Settings.from_env()
    client = client or s3_client(settings)
    location, folder = S3Location.parse(s3_uri), Path(folder)
    files = _folder_files(folder)
    entries = {name: ManifestEntry(sha256=sha256_file(path), size=path.stat().st_size) for name, path in files.items()}
    transfer = _transfer_config(settings)

    def upload(name: str) -> None:
        with_retries(lambda: client.upload_file(str(files[name]), location.bucket, location.key(name),
                                                Config=transfer), location.uri(name), settings)

    started = time.perf_counter()
    with ThreadPoolExecutor(settings.transfer_threads) as pool:
        list(pool.map(upload, files))
    raw = json.dumps({name: entry.model_dump() for name, entry in entries.items()}, indent=1).encode()
    with_retries(lambda: client.put_object(Bucket=location.bucket, Key=location.key(MANIFEST), Body=raw,
                                           ContentType="application/json"), location.uri(MANIFEST), settings)
    log.info("uploaded %d files (%.1f MB) to %s in %.1f s", len(files), sum(e.size for e in entries.values()) / 1e6,
             location.uri(), time.perf_counter() - started)
    return Manifest(entries, hashlib.sha256(raw).hexdigest(), raw)


def _get_bytes(client, location: S3Location, name: str, settings: Settings) -> bytes:
    def get() -> bytes:
        return client.get_object(Bucket=location.bucket, Key=location.key(name))["Body"].read()

    return with_retries(get, location.uri(name), settings)


def read_manifest(s3_uri: str, *, settings: Settings | None = None, client=None) -> Manifest:
    """The manifest of the expert at S3_URI, validated: safe relative names, sha256 and size for each, no pickles."""
    settings = settings or Settings.from_env()
    client = client or s3_client(settings)
    location = S3Location.parse(s3_uri)
    raw = _get_bytes(client, location, MANIFEST, settings)
    try:
        files = _MANIFEST_FILES.validate_json(raw)
    except ValidationError as exc:
        raise StorageError(f"{location.uri(MANIFEST)}: not a manifest ({exc.errors()[0]['msg']}); re-upload "
                           "the folder") from exc
    for name in files:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or "\\" in name or not name or name == MANIFEST:
            raise StorageError(f"{location.uri(MANIFEST)}: unsafe file name {name!r}; re-upload it")
        if path.suffix in PICKLE_SUFFIXES:
            raise StorageError(f"{location.uri(MANIFEST)}: lists pickle file {name}; mergeplan never loads pickles")
    return Manifest(files, hashlib.sha256(raw).hexdigest(), raw)


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


GC_LOCK = "gc"
HOLD_PREFIX = ".hold-"
_HELD: dict[Path, object] = {}  # hold files this process keeps locked, by path


def cached_folder(cache_dir: Path, manifest_sha256: str) -> Path:
    """Where the cache under CACHE_DIR keeps (or will keep) the stored folder with this manifest."""
    return Path(cache_dir) / "folders" / manifest_sha256


def hold_folder(folder: Path) -> None:
    """Keep FOLDER (which may not exist yet) from garbage collection for as long as this process lives (a flow run
    uses what it downloaded or merged until it ends): a shared lock on the sibling file .hold-NAME that the kernel
    drops at exit. Marks the folder used now, for the LRU order."""
    lock = folder.parent / f"{HOLD_PREFIX}{folder.name}"
    if lock not in _HELD:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")  # noqa: SIM115 - kept open on purpose: the lock lives with the process
        fcntl.flock(handle, fcntl.LOCK_SH)
        _HELD[lock] = handle
    with contextlib.suppress(FileNotFoundError):
        os.utime(folder)


@contextmanager
def exclusive_or_busy(lock: Path) -> Iterator[bool]:
    """True, with LOCK held exclusively until the block ends, when no other holder has it; False (at once) when
    one does."""
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def unless_held(folder: Path) -> contextlib.AbstractContextManager[bool]:
    """True, with FOLDER locked against new holders until the block ends (so it can be removed), when no live
    process holds it; False when one does."""
    return exclusive_or_busy(folder.parent / f"{HOLD_PREFIX}{folder.name}")


class FolderCache:
    """The content-addressed download cache (layout in the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        for folder in ("blobs", "partial", "folders", "locks"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    def blob(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def has_blob(self, entry: ManifestEntry) -> bool:
        path = self.blob(entry.sha256)
        return path.is_file() and path.stat().st_size == entry.size

    def folder(self, manifest_sha256: str) -> Path:
        return cached_folder(self.root, manifest_sha256)

    def partial(self, sha256: str) -> Path:
        return self.root / "partial" / f"{sha256}.part"

    def remove_partials(self, sha256: str) -> None:
        """Delete this blob's unfinished downloads (boto3 adds a random suffix to its own temporary file)."""
        for path in (self.root / "partial").glob(f"{sha256}.part*"):
            path.unlink(missing_ok=True)

    @contextmanager
    def _flocked(self, name: str, mode: int) -> Iterator[None]:
        """Across threads and processes; released by the kernel if the holder is killed."""
        with open(self.root / "locks" / name, "a") as handle:
            fcntl.flock(handle, mode)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Exclusive: one process at a time fetches a blob or assembles a folder."""
        return self._flocked(name, fcntl.LOCK_EX)

    def downloading(self) -> contextlib.AbstractContextManager[None]:
        """Shared with every other download, exclusive with garbage collection: no blob vanishes mid-download."""
        return self._flocked(GC_LOCK, fcntl.LOCK_SH)


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


def _assemble(cache: FolderCache, manifest: Manifest) -> Path:
    """The folder of hard links to verified blobs, published by one rename."""
    final = cache.folder(manifest.sha256)
    with cache.lock(f"folder-{manifest.sha256}"):
        if final.is_dir():
            return final
        staging = final.with_name(f".{manifest.sha256}.staging")
        shutil.rmtree(staging, ignore_errors=True)  # a killed assembly's leftovers; we hold the lock
        for name, entry in manifest.files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(cache.blob(entry.sha256), target)
            except OSError:  # a file system without hard links
                shutil.copyfile(cache.blob(entry.sha256), target)
        (staging / MANIFEST).write_bytes(manifest.raw)
        os.rename(staging, final)
    return final


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
        folder = _assemble(cache, manifest)
        hold_folder(cache.folder(manifest.sha256))
    if wanted:  # the limit is checked only when the cache grew
        collect_garbage(cache.root, int(settings.cache_max_gb * 1e9))
    return folder


@dataclass(frozen=True)
class GarbageReport:
    before_bytes: int
    after_bytes: int
    removed: list[str]  # the folders removed (manifest sha256, or KIND/KEY under work/), least recently used first
    held: list[str]  # folders over the limit that a live process holds, kept
    busy: bool = False  # a download was in progress: nothing was removed

    @property
    def freed_bytes(self) -> int:
        return self.before_bytes - self.after_bytes


def cache_bytes(root: Path) -> int:
    """The cache's size on disk: its blobs and partial downloads (folders are hard links to the blobs)."""
    total = 0
    for folder in ("blobs", "partial"):
        for path in (Path(root) / folder).iterdir() if (Path(root) / folder).is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
    return total


def collect_garbage(root: Path, max_bytes: int) -> GarbageReport:
    """Remove the least recently used folders (and the blobs no other folder links) until the cache is at most
    MAX_BYTES; never a folder a live process holds (FolderCache.hold), never while a download runs."""
    cache = FolderCache(root)
    before = cache_bytes(root)
    if before <= max_bytes:
        return GarbageReport(before, before, [], [])
    with exclusive_or_busy(cache.root / "locks" / GC_LOCK) as collecting:
        if not collecting:
            return GarbageReport(before, before, [], [], busy=True)
        size, removed, held = before, [], []
        folders = sorted((p for p in (cache.root / "folders").iterdir() if not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime)
        for folder in folders:
            if size <= max_bytes:
                break
            with unless_held(folder) as removable:
                if not removable:
                    held.append(folder.name)
                    continue
                blobs = {entry.sha256
                         for entry in _MANIFEST_FILES.validate_json((folder / MANIFEST).read_bytes()).values()}
                shutil.rmtree(folder)
            for sha256 in blobs:
                blob = cache.blob(sha256)
                # no other folder has this file when its only link left is the one in blobs/
                if blob.is_file() and blob.stat().st_nlink == 1:
                    size -= blob.stat().st_size
                    blob.unlink()
            removed.append(folder.name)
    log.info("cache %s: %.1f MB -> %.1f MB, %d folders removed, %d held by running processes kept", root,
             before / 1e6, size / 1e6, len(removed), len(held))
    return GarbageReport(before, size, removed, held)


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
