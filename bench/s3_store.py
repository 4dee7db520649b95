"""Benchmark: the local S3 servers side by side, SeaweedFS (the default, on disk) and moto (in memory).

For each, through infra.stack on free ports: start-up until healthy, upload and download of a checkpoint
folder (one tensor of --megabytes, multipart, sha256-verified by infra.s3), the server's RSS, and after a
SIGKILL and restart whether the expert is still there. Prints medians over --repeats and the ratios.

    .venv/bin/python bench/s3_store.py --megabytes 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

from infra import stack
from infra.errors import StorageError
from infra.s3 import download_folder, upload_folder
from infra.settings import S3_INTERNAL_PORTS, Settings


def checkpoint(folder: Path, megabytes: int) -> Path:
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    save_file({"weight": torch.randn(megabytes * 2**18, generator=generator)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def server_rss_mb(settings: Settings) -> float:
    process = psutil.Process(json.loads((settings.stack_dir / "s3.pid").read_text())["pid"])
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def measure(server: str, folder: Path, work: Path, repeats: int) -> dict:
    settings = Settings(state_dir=work / server, s3_server=server, s3_port=stack.free_port_block(S3_INTERNAL_PORTS + 1))
    figures: dict[str, list[float]] = {"start_s": [], "upload_s": [], "download_s": []}
    try:
        for repeat in range(repeats):
            started = time.perf_counter()
            stack.up(settings, ["s3"])
            figures["start_s"].append(time.perf_counter() - started)
            uri = f"s3://{settings.bucket}/experts/bench/e{repeat}"
            started = time.perf_counter()
            upload_folder(folder, uri, settings=settings)
            figures["upload_s"].append(time.perf_counter() - started)
            started = time.perf_counter()
            download_folder(uri, work / f"{server}-cache-{repeat}", settings=settings)
            figures["download_s"].append(time.perf_counter() - started)
            rss = server_rss_mb(settings)
            if repeat < repeats - 1:
                stack.down(settings, ["s3"])
        pid = json.loads((settings.stack_dir / "s3.pid").read_text())["pid"]
        os.killpg(pid, signal.SIGKILL)
        psutil.wait_procs([psutil.Process(pid)], timeout=10)
        stack.up(settings, ["s3"])
        try:
            download_folder(f"s3://{settings.bucket}/experts/bench/e0", work / f"{server}-after-kill",
                            settings=settings)
            survived = True
        except StorageError:
            survived = False
    finally:
        stack.down(settings, ["s3"])
    return {name: statistics.median(values) for name, values in figures.items()} | {
        "rss_mb": rss, "survives_kill": survived}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        folder = checkpoint(work / "model", args.megabytes)
        results = {server: measure(server, folder, work, args.repeats) for server in ("seaweedfs", "moto")}
    print(f"{args.megabytes} MB checkpoint, median of {args.repeats}")
    print(f"{'':<10}{'start s':>9}{'upload s':>10}{'MB/s':>8}{'download s':>12}{'MB/s':>8}{'RSS MB':>8}  after kill -9")
    for server, r in results.items():
        print(f"{server:<10}{r['start_s']:>9.2f}{r['upload_s']:>10.2f}{args.megabytes / r['upload_s']:>8.0f}"
              f"{r['download_s']:>12.2f}{args.megabytes / r['download_s']:>8.0f}{r['rss_mb']:>8.0f}  "
              f"{'kept' if r['survives_kill'] else 'lost'}")
    sw, moto = results["seaweedfs"], results["moto"]
    print(f"seaweedfs / moto: start {sw['start_s'] / moto['start_s']:.2f}x, "
          f"upload {sw['upload_s'] / moto['upload_s']:.2f}x, download {sw['download_s'] / moto['download_s']:.2f}x, "
          f"RSS {sw['rss_mb'] / moto['rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
