"""Benchmark: the webhook receiver under concurrent deliveries, half of them forged.

The receiver (infra.webhook.WebhookServer, on a free loopback port) records events instead of sending them to
Prefect, so what is measured is the receiver: signature checks, parsing, threading. --requests deliveries are
sent by --clients threads at once, half signed with the secret and half with another; prints throughput, the
median and p99 latency of each kind, and whether every valid delivery emitted exactly one event and no forged
one emitted any. Medians over --repeats rounds.

    .venv/bin/python bench/webhook_load.py --requests 200 --clients 50 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

from infra.settings import Settings
from infra.stack import free_port_block
from infra.webhook import WebhookServer, sign

SECRET = "bench-secret"
BODY = json.dumps({"entity": "model_version", "action": "created", "timestamp": "2026-01-01T00:00:00+00:00",
                   "data": {"name": "expert.bench.algebra", "version": "1", "source": "s3://b/e",
                            "tags": {"domain": "algebra", "base": "bench", "s3_uri": "s3://b/e",
                                     "sha256": "ab" * 32}}}).encode()


def deliver(url: str, secret: str) -> tuple[int, float]:
    delivery_id, timestamp = str(uuid.uuid4()), str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
               "X-MLflow-Timestamp": timestamp, "X-MLflow-Signature": sign(secret, delivery_id, timestamp, BODY)}
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=BODY, headers=headers), timeout=60) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    return status, time.perf_counter() - started


def one_round(requests: int, clients: int, seed: int) -> dict:
    with TemporaryDirectory() as state:
        emitted = []
        settings = Settings(state_dir=Path(state), webhook_port=free_port_block(1))
        server = WebhookServer(settings, SECRET, emit=emitted.append)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.server_address[1]}{server.path}"
        secrets = [SECRET] * (requests // 2) + ["forged"] * (requests - requests // 2)
        random.Random(seed).shuffle(secrets)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            results = list(pool.map(lambda secret: (secret, *deliver(url, secret)), secrets))
        seconds = time.perf_counter() - started
        server.shutdown()
        server.server_close()
    valid = [(status, latency) for secret, status, latency in results if secret == SECRET]
    forged = [(status, latency) for secret, status, latency in results if secret != SECRET]
    return {"per_second": requests / seconds,
            "valid_p50_ms": 1000 * statistics.median(t for _, t in valid),
            "valid_p99_ms": 1000 * statistics.quantiles([t for _, t in valid], n=100)[98],
            "forged_p99_ms": 1000 * statistics.quantiles([t for _, t in forged], n=100)[98],
            "correct": (all(s == 200 for s, _ in valid) and all(s == 401 for s, _ in forged)
                        and len(emitted) == len(valid) and len({e.id for e in emitted}) == len(valid))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rounds = [one_round(args.requests, args.clients, seed) for seed in range(args.repeats)]
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "correct"}
    print(f"{args.requests} deliveries (half forged), {args.clients} concurrent clients, median of {args.repeats}:")
    print(f"  {median['per_second']:.0f} deliveries/s; valid p50 {median['valid_p50_ms']:.1f} ms, "
          f"p99 {median['valid_p99_ms']:.1f} ms; forged p99 {median['forged_p99_ms']:.1f} ms")
    print(f"  every valid one emitted once, no forged one emitted, none dropped: "
          f"{sum(r['correct'] for r in rounds)}/{len(rounds)} rounds")


if __name__ == "__main__":
    main()
