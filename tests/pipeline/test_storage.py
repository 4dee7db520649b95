"""The S3 expert store against a real moto server: round trip, cache, verification, faults."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from botocore.exceptions import ConnectionClosedError
from mlops_support import ACCESS_KEY, SECRET_KEY, free_port, one_tensor_checkpoint

from infra.cache import cache_bytes, collect_garbage
from infra.errors import StorageError
from infra.manifest import MANIFEST
from infra.s3 import download_folder, expert_uri, list_experts, read_manifest, s3_client, upload_expert
from merging.errors import CheckpointError
from merging.io.checkpoint import CheckpointReader
from merging.io.hashing import sha256_file


def count_gets(client) -> list[str]:
    """The keys of every GetObject and HeadObject CLIENT sends from now on."""
    keys: list[str] = []
    client.meta.events.register("provide-client-params.s3.GetObject", lambda params, **_: keys.append(params["Key"]))
    client.meta.events.register("provide-client-params.s3.HeadObject", lambda params, **_: keys.append(params["Key"]))
    return keys


def test_round_trip_verifies_every_file(s3_service, zoo, tmp_path):
    uri = expert_uri("tiny-base", "roundtrip", s3_service)
    manifest = upload_expert(zoo["experts"][0], uri, settings=s3_service)
    folder = download_folder(uri, tmp_path / "cache", settings=s3_service)

    source_files = sorted(p.name for p in zoo["experts"][0].iterdir())
    assert sorted(manifest.files) == source_files and len(source_files) > 3  # sharded: several files
    for name in source_files:
        assert sha256_file(folder / name) == sha256_file(zoo["experts"][0] / name) == manifest.files[name].sha256
    assert json.loads((folder / MANIFEST).read_text()) == {n: e.model_dump() for n, e in manifest.files.items()}
    assert CheckpointReader(folder).names() == CheckpointReader(zoo["experts"][0]).names()
    assert not list((tmp_path / "cache" / "partial").iterdir())


def test_second_download_fetches_only_the_manifest(s3_service, s3, zoo, tmp_path):
    uri = expert_uri("tiny-base", "cached", s3_service)
    upload_expert(zoo["experts"][1], uri, settings=s3_service)
    first_gets = count_gets(s3)
    first = download_folder(uri, tmp_path, settings=s3_service, client=s3)
    assert len(first_gets) > 3

    second_client = s3_client(s3_service)
    second_gets = count_gets(second_client)
    assert download_folder(uri, tmp_path, settings=s3_service, client=second_client) == first
    assert second_gets == [f"experts/tiny-base/cached/{MANIFEST}"]


def test_files_shared_between_experts_are_fetched_once(s3_service, s3, zoo, tmp_path):
    for index in (2, 3):
        upload_expert(zoo["experts"][index], expert_uri("tiny-base", f"shared{index}", s3_service), settings=s3_service)
    download_folder(expert_uri("tiny-base", "shared2", s3_service), tmp_path, settings=s3_service)
    gets = count_gets(s3)
    download_folder(expert_uri("tiny-base", "shared3", s3_service), tmp_path, settings=s3_service, client=s3)
    # Both experts have the base's config.json: its blob is in the cache already.
    assert "experts/tiny-base/shared3/config.json" not in gets
    assert any(key.endswith(".safetensors") for key in gets)


def test_sha256_mismatch_is_refused_and_nothing_is_kept(s3_service, s3, tmp_path):
    folder = one_tensor_checkpoint(tmp_path / "model", megabytes=1)
    uri = expert_uri("tiny-base", "tampered", s3_service)
    manifest = upload_expert(folder, uri, settings=s3_service)
    s3.put_object(Bucket=s3_service.bucket, Key="experts/tiny-base/tampered/model.safetensors", Body=b"x" * 1000)

    cache = tmp_path / "cache"
    with pytest.raises(StorageError, match=r"tampered/model\.safetensors: sha256 .* differs from the manifest"):
        download_folder(uri, cache, settings=s3_service)
    assert not (cache / "blobs" / manifest.files["model.safetensors"].sha256).exists()
    assert not list((cache / "partial").iterdir())
    assert not list((cache / "folders").iterdir())


KILLED_DOWNLOAD = """
import os, signal, sys, time
from infra.settings import Settings
from infra.s3 import download_folder, s3_client

settings = Settings.from_env()
client = s3_client(settings)
ranged = []

def die_on_third_part(params, **_):
    if "Range" in params:
        ranged.append(params["Range"])
        if len(ranged) == 3:
            time.sleep(0.5)  # let the first two parts reach the disk
            os.kill(os.getpid(), signal.SIGKILL)

client.meta.events.register("provide-client-params.s3.GetObject", die_on_third_part)
download_folder(sys.argv[1], sys.argv[2], settings=settings, client=client)
"""


def test_killed_download_leaves_only_a_partial_that_the_next_run_discards(s3_service, tmp_path):
    settings = s3_service.model_copy(update={"transfer_threads": 1, "multipart_chunk_mb": 5})
    folder = one_tensor_checkpoint(tmp_path / "model", megabytes=16, seed=3)
    uri = expert_uri("tiny-base", "killed", settings)
    manifest = upload_expert(folder, uri, settings=settings)
    cache = tmp_path / "cache"

    child = subprocess.run([sys.executable, "-c", KILLED_DOWNLOAD, uri, str(cache)], env=os.environ | settings.as_env(),
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stderr
    partials = list((cache / "partial").iterdir())
    assert partials and sum(p.stat().st_size for p in partials) > 0  # the killed run wrote part of the file
    weights = manifest.files["model.safetensors"].sha256
    assert not (cache / "blobs" / weights).exists() and not list((cache / "folders").iterdir())

    result = download_folder(uri, cache, settings=settings)
    assert sha256_file(result / "model.safetensors") == manifest.files["model.safetensors"].sha256
    assert not list((cache / "partial").iterdir())


def test_connection_lost_mid_file_is_retried(s3_service, tmp_path, caplog):
    settings = s3_service.model_copy(update={"transfer_threads": 2, "multipart_chunk_mb": 5})
    folder = one_tensor_checkpoint(tmp_path / "model", megabytes=12, seed=4)
    uri = expert_uri("tiny-base", "flaky", settings)
    manifest = upload_expert(folder, uri, settings=settings)
    client = s3_client(settings)
    ranged: list[str] = []

    def drop_second_part_once(params, **_):
        if "Range" in params:
            ranged.append(params["Range"])
            if len(ranged) == 2:
                raise ConnectionClosedError(endpoint_url=settings.s3_endpoint)

    client.meta.events.register("provide-client-params.s3.GetObject", drop_second_part_once)
    with caplog.at_level(logging.WARNING, logger="mergeplan"):
        result = download_folder(uri, tmp_path / "cache", settings=settings, client=client)
    assert sha256_file(result / "model.safetensors") == manifest.files["model.safetensors"].sha256
    assert "retrying" in caplog.text and len(ranged) > 3


def test_unreachable_endpoint_is_retried_then_named(s3_service, tmp_path, caplog):
    endpoint = f"http://127.0.0.1:{free_port()}"
    settings = s3_service.model_copy(update={"s3_endpoint": endpoint})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mergeplan"), \
            pytest.raises(StorageError, match=f"S3 endpoint {endpoint} failed 3 times .*MERGEPLAN_S3_ENDPOINT"):
        download_folder("s3://mergeplan/experts/tiny-base/algebra", tmp_path / "cache", settings=settings)
    assert time.monotonic() - started < 10
    assert caplog.text.count("retrying") == 2


def test_missing_expert_names_the_manifest_key(s3_service, tmp_path):
    with pytest.raises(StorageError, match=r"s3://mergeplan/experts/tiny-base/nobody/manifest\.json: no such object"):
        download_folder(expert_uri("tiny-base", "nobody", s3_service), tmp_path, settings=s3_service)


def test_missing_file_names_its_key(s3_service, s3, tmp_path):
    folder = one_tensor_checkpoint(tmp_path / "model", megabytes=1, seed=5)
    uri = expert_uri("tiny-base", "incomplete", s3_service)
    upload_expert(folder, uri, settings=s3_service)
    s3.delete_object(Bucket=s3_service.bucket, Key="experts/tiny-base/incomplete/model.safetensors")
    with pytest.raises(StorageError, match=r"incomplete/model\.safetensors: no such object"):
        download_folder(uri, tmp_path / "cache", settings=s3_service)
    assert not list((tmp_path / "cache" / "folders").iterdir())


def test_missing_bucket_is_named(s3_service, tmp_path):
    with pytest.raises(StorageError, match="s3://no-such-bucket/x/manifest.json: the bucket does not exist"):
        download_folder("s3://no-such-bucket/x", tmp_path, settings=s3_service)


def test_pickle_files_are_never_uploaded(s3_service, s3, tmp_path):
    folder = one_tensor_checkpoint(tmp_path / "model", megabytes=1, seed=6)
    (folder / "training_args.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"training_args\.bin: pickle file"):
        upload_expert(folder, expert_uri("tiny-base", "pickled", s3_service), settings=s3_service)
    assert "Contents" not in s3.list_objects_v2(Bucket=s3_service.bucket, Prefix="experts/tiny-base/pickled/")


def test_manifest_with_an_escaping_name_is_refused(s3_service, s3, tmp_path):
    manifest = {"../../outside": {"sha256": "0" * 64, "size": 1}}
    s3.put_object(Bucket=s3_service.bucket, Key="experts/tiny-base/escape/manifest.json", Body=json.dumps(manifest))
    with pytest.raises(StorageError, match="unsafe file name"):
        download_folder(expert_uri("tiny-base", "escape", s3_service), tmp_path, settings=s3_service)
    assert not (tmp_path.parent / "outside").exists()


def test_list_experts_shows_complete_uploads_only(s3_service, s3, tmp_path):
    settings = s3_service.model_copy(update={"bucket": "listing"})
    s3.create_bucket(Bucket="listing")
    for name, seed in (("beta", 7), ("alpha", 8)):
        upload_expert(one_tensor_checkpoint(tmp_path / name, megabytes=1, seed=seed),
                      expert_uri("other-base", name, settings), settings=settings)
    s3.put_object(Bucket="listing", Key="experts/other-base/half/model.safetensors", Body=b"no manifest yet")
    assert list_experts("other-base", settings=settings) == [
        "s3://listing/experts/other-base/alpha", "s3://listing/experts/other-base/beta"]
    assert read_manifest("s3://listing/experts/other-base/alpha", settings=settings).files.keys() == {
        "config.json", "model.safetensors"}


def test_no_credentials_in_log_records(s3_service, zoo, tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger="mergeplan"):
        uri = expert_uri("tiny-base", "quiet", s3_service)
        upload_expert(zoo["experts"][0], uri, settings=s3_service)
        download_folder(uri, tmp_path, settings=s3_service)
        logging.getLogger("mergeplan").info("settings in use: %r", s3_service)
    assert caplog.records
    assert SECRET_KEY not in caplog.text and ACCESS_KEY not in caplog.text
    assert "**********" in caplog.text


def test_cache_folder_is_read_only_shared_content(s3_service, zoo, tmp_path):
    uri = expert_uri("tiny-base", "readonly", s3_service)
    upload_expert(zoo["experts"][0], uri, settings=s3_service)
    folder = download_folder(uri, tmp_path, settings=s3_service)
    shard = next(Path(folder).glob("*.safetensors"))
    assert shard.stat().st_nlink == 2  # the expert's file and its blob are one inode
    assert not shard.stat().st_mode & 0o222


HOLDING_DOWNLOAD = """
import sys, time
from infra.settings import Settings
from infra.s3 import download_folder

print(download_folder(sys.argv[1], sys.argv[2], settings=Settings.from_env()), flush=True)
time.sleep(120)  # a flow run still using what it downloaded
"""


def test_cache_gc_removes_least_recently_used_folders_and_keeps_held_ones(s3_service, tmp_path):
    settings = s3_service.model_copy(update={"cache_max_gb": 1000})
    cache = tmp_path / "cache"
    env = os.environ | settings.as_env()
    uris = [expert_uri("tiny-base", f"gc{index}", settings) for index in range(4)]
    manifests = [upload_expert(one_tensor_checkpoint(tmp_path / f"m{index}", megabytes=2, seed=10 + index), uri,
                               settings=settings) for index, uri in enumerate(uris)]
    # three downloads by processes that have exited (nothing holds them), one by a process still running
    for uri in uris[:3]:
        subprocess.run([sys.executable, "-m", "mergeplan.cli", "expert", "download", uri, "--cache", str(cache)],
                       env=env, check=True, capture_output=True, timeout=120)
    holder = subprocess.Popen([sys.executable, "-c", HOLDING_DOWNLOAD, uris[3], str(cache)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        held_folder = Path(holder.stdout.readline().strip())
        folders = [cache / "folders" / m.sha256 for m in manifests]
        for index, folder in enumerate(folders):  # last used: gc3 (held) longest ago, then gc2, gc1, gc0
            os.utime(folder, (time.time() - 100 * (index + 1),) * 2)
        assert held_folder == folders[3]
        before = cache_bytes(cache)
        weights = 2 * 2**20 + 200  # each folder's own blob; config.json is one blob all four share

        report = collect_garbage(cache, before - weights - 1000)  # room for all but about one folder
        assert report.held == [manifests[3].sha256]  # the oldest, but held: kept
        assert report.removed == [manifests[2].sha256, manifests[1].sha256]  # then least recently used first
        assert not folders[2].exists() and not folders[1].exists() and folders[0].is_dir() and folders[3].is_dir()
        assert report.after_bytes == cache_bytes(cache) <= before - weights - 1000
        for kept in (folders[0], folders[3]):  # intact, shared config.json included
            assert sha256_file(kept / "config.json") == manifests[0].files["config.json"].sha256
            assert sha256_file(kept / "model.safetensors") == (
                manifests[folders.index(kept)].files["model.safetensors"].sha256)
    finally:
        holder.kill()
        holder.wait(30)
    # the holder is gone: its folder is an ordinary least recently used one now
    assert collect_garbage(cache, 1).removed == [manifests[3].sha256, manifests[0].sha256]
    assert cache_bytes(cache) == 0


def test_cache_gc_command_reports_and_refuses_a_bad_limit(s3_service, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("MERGEPLAN_CACHE_DIR", str(tmp_path / "cache"))
    status, out, err = run_cli("cache", "gc", "--max-gb", "0")
    assert status == 2 and err.startswith("error: --max-gb: the limit must be positive"), err
    status, out, err = run_cli("cache", "gc", "--max-gb", "1")
    assert status == 0 and "0.0 MB -> 0.0 MB (limit 1 GB); 0 folders removed" in out, err


def test_a_download_that_grows_the_cache_over_its_limit_evicts_unheld_folders(s3_service, tmp_path):
    cache = tmp_path / "cache"
    uris = [expert_uri("tiny-base", f"limit{index}", s3_service) for index in range(2)]
    manifests = [upload_expert(one_tensor_checkpoint(tmp_path / f"m{index}", megabytes=2, seed=20 + index), uri,
                               settings=s3_service) for index, uri in enumerate(uris)]
    env = os.environ | s3_service.as_env() | {"MERGEPLAN_CACHE_MAX_GB": "0.003"}  # room for one 2 MB folder
    for uri in uris:
        subprocess.run([sys.executable, "-m", "mergeplan.cli", "expert", "download", uri, "--cache", str(cache)],
                       env=env, check=True, capture_output=True, timeout=120)
    assert not (cache / "folders" / manifests[0].sha256).exists()  # evicted by the second download
    assert sha256_file(cache / "folders" / manifests[1].sha256 / "model.safetensors") == (
        manifests[1].files["model.safetensors"].sha256)
    assert cache_bytes(cache) <= 3e6
