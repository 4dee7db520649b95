"""The local caches: the content-addressed download cache of stored folders, and STATE/work (each job's output
folder, work/KIND/KEY); both with a size limit, kept by removing least recently used folders that no live process
holds.

The download cache:

    CACHE/blobs/SHA256          verified file contents, read-only, shared by every folder that has the file
    CACHE/partial/SHA256.part*  downloads in progress; never read, deleted by the next download of that blob
    CACHE/folders/MANIFEST_SHA  one folder per stored version: hard links to the blobs + manifest.json
    CACHE/folders/.hold-SHA     a flock file that a process using the folder keeps share-locked until it exits
    CACHE/locks/                flock files, so that processes sharing a cache fetch each blob once

A folder appears by an atomic rename once every blob is verified, so a folder in folders/ is always complete,
and a second download of the same manifest fetches nothing but the manifest. The cache has a size limit
(Settings.cache_max_gb): collect_garbage removes least recently used folders (mtime, set on each use) and the
blobs only they linked, never a held folder and never while a download runs. STATE/work has its own limit
(Settings.work_max_gb), kept the same way by collect_work_garbage.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from infra.manifest import MANIFEST, Manifest, ManifestEntry, manifest_files
from infra.settings import Settings

log = logging.getLogger("mergeplan")

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

    def assemble(self, manifest: Manifest) -> Path:
        """The folder of hard links to the manifest's verified blobs, published by one rename."""
        final = self.folder(manifest.sha256)
        with self.lock(f"folder-{manifest.sha256}"):
            if final.is_dir():
                return final
            staging = final.with_name(f".{manifest.sha256}.staging")
            shutil.rmtree(staging, ignore_errors=True)  # a killed assembly's leftovers; we hold the lock
            for name, entry in manifest.files.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(self.blob(entry.sha256), target)
                except OSError:  # a file system without hard links
                    shutil.copyfile(self.blob(entry.sha256), target)
            (staging / MANIFEST).write_bytes(manifest.raw)
            os.rename(staging, final)
        return final


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
    MAX_BYTES; never a folder a live process holds (hold_folder), never while a download runs."""
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
                blobs = {entry.sha256 for entry in manifest_files((folder / MANIFEST).read_bytes()).values()}
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


def work_folder(settings: Settings, *parts: str) -> Path:
    """STATE/work, where jobs keep their outputs; with PARTS (KIND, KEY), one job's folder in it."""
    return settings.state_dir.joinpath("work", *parts).resolve()


def job_folder(output: Path, work: Path) -> Path:
    """What garbage collection keeps or removes whole: work/KIND/KEY for an output under WORK, else the output."""
    if output.is_relative_to(work) and len(output.relative_to(work).parts) >= 2:
        return work.joinpath(*output.relative_to(work).parts[:2])
    return output


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def collect_work_garbage(work: Path, max_bytes: int) -> GarbageReport:
    """Remove the least recently used job folders (work/KIND/KEY) until WORK holds at most MAX_BYTES; never one a
    live process holds; nothing when another collection runs."""
    folders = sorted((folder for kind in (work.iterdir() if work.is_dir() else []) if kind.is_dir()
                      for folder in kind.iterdir() if folder.is_dir() and not folder.name.startswith(".")),
                     key=lambda folder: folder.stat().st_mtime)
    sizes = {folder: folder_bytes(folder) for folder in folders}
    before = size = sum(sizes.values())
    if before <= max_bytes:
        return GarbageReport(before, before, [], [])
    with exclusive_or_busy(work / ".gc") as collecting:
        if not collecting:
            return GarbageReport(before, before, [], [], busy=True)
        removed, held = [], []
        for folder in folders:
            if size <= max_bytes:
                break
            with unless_held(folder) as removable:
                if removable:
                    shutil.rmtree(folder)
                    size -= sizes[folder]
            (removed if removable else held).append(str(folder.relative_to(work)))
    log.info("work %s: %.1f MB -> %.1f MB, %d job folders removed, %d held by running processes kept", work,
             before / 1e6, size / 1e6, len(removed), len(held))
    return GarbageReport(before, size, removed, held)
