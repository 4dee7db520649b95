"""The default local S3 (SeaweedFS, on disk) loses nothing across `down`/`up`, a kill -9 of its process, and a
kill -9 in the middle of an upload (which leaves no expert: the manifest is written last)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from pipeline.mlops_support import one_tensor_checkpoint, stack_settings

from infra import stack
from infra.errors import StorageError
from infra.s3 import download_folder, read_manifest, s3_client, upload_expert, upload_folder
from infra.settings import Settings


@pytest.fixture()
def store(tmp_path) -> Iterator[Settings]:
    settings = stack_settings(tmp_path / "state", s3_server="seaweedfs")
    stack.up(settings, ["s3"])
    yield settings
    stack.down(settings, ["s3"])


def kill_s3(settings: Settings) -> None:
    """SIGKILL the S3 server's process group, as a crash or an OOM kill would, and wait until it is gone."""
    pid = json.loads((settings.stack_dir / "s3.pid").read_text())["pid"]
    os.killpg(pid, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(pid)], timeout=10)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.name != "manifest.json"}


def s3_state(settings: Settings) -> str:
    return next(state.state for state in stack.status(settings) if state.name == "s3")


def test_objects_survive_down_up_and_kill(store, zoo, tmp_path):
    uri = f"s3://{store.bucket}/experts/tiny-base/algebra"
    upload_expert(zoo["experts"][0], uri, settings=store)
    expected = digests(zoo["experts"][0])

    stack.down(store, ["s3"])
    assert s3_state(store) == "stopped"
    stack.up(store, ["s3"])
    assert digests(download_folder(uri, tmp_path / "after-down", settings=store)) == expected

    kill_s3(store)
    assert s3_state(store) == "dead"
    stack.up(store, ["s3"])
    assert digests(download_folder(uri, tmp_path / "after-kill", settings=store)) == expected
    note = next(state.note for state in stack.status(store) if state.name == "s3")
    megabytes = float(note.removeprefix(f"data in {store.s3_data_dir} (").removesuffix(" MB)"))
    assert megabytes > 0


def test_upload_killed_midway_leaves_no_expert_and_the_retry_completes(store, tmp_path):
    folder = one_tensor_checkpoint(tmp_path / "model", megabytes=96)
    uri = f"s3://{store.bucket}/experts/tiny-base/big"
    failure: list[BaseException] = []

    def upload() -> None:
        try:
            upload_folder(folder, uri, settings=store)
        except BaseException as exc:  # noqa: BLE001 - the thread hands it to the test
            failure.append(exc)

    uploading = threading.Thread(target=upload)
    uploading.start()
    client = s3_client(store)
    deadline = time.monotonic() + 60
    # kill once the upload has begun writing parts (an upload in progress), before it can finish
    while not client.list_multipart_uploads(Bucket=store.bucket).get("Uploads") and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_s3(store)
    uploading.join(120)
    assert failure and isinstance(failure[0], StorageError), failure

    stack.up(store, ["s3"])
    with pytest.raises(StorageError, match="manifest.json"):
        read_manifest(uri, settings=store)  # not an expert: a reader never sees the half-upload
    upload_folder(folder, uri, settings=store)
    assert digests(download_folder(uri, tmp_path / "cache", settings=store)) == digests(folder)
