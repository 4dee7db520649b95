"""The webhook receiver: signatures as MLflow makes them, what it emits, and the chain MLflow -> receiver -> Prefect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from mlflow.webhooks.delivery import _generate_hmac_signature
from mlops_support import WEBHOOK_SECRET, free_port, read_events

from infra.registry import ensure_webhook, register_expert
from infra.s3 import expert_uri, upload_expert
from infra.settings import Settings
from infra.webhook import EVENT_NAME, WebhookServer, prefect_emitter

S3_URI = "s3://mergeplan/experts/tiny-base/algebra"
SHA = "ab" * 32


def delivery(name: str = "expert.tiny-base.algebra", tags: dict | None = None) -> bytes:
    """A model_version.created body exactly as MLflow 3 serialises it."""
    tags = {"domain": "algebra", "base": "tiny-base", "s3_uri": S3_URI, "sha256": SHA} if tags is None else tags
    return json.dumps({"entity": "model_version", "action": "created", "timestamp": "2026-01-01T00:00:00+00:00",
                       "data": {"name": name, "version": "3", "source": S3_URI, "run_id": None, "tags": tags,
                                "description": None}}).encode()


def post(server: WebhookServer, body: bytes, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None,
         delivery_id: str | None = None, signed: bool = True) -> tuple[int, dict]:
    delivery_id = delivery_id or str(uuid.uuid4())
    timestamp = str(int(time.time()) if timestamp is None else timestamp)
    headers = {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
               "X-MLflow-Timestamp": timestamp}
    if signed:  # signed by MLflow's own code, so the receiver is checked against the real format
        headers["X-MLflow-Signature"] = _generate_hmac_signature(secret, delivery_id, timestamp, body.decode())
    request = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}{server.path}", data=body,
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def running(server: WebhookServer) -> Iterator[WebhookServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def emitted() -> list:
    return []


@pytest.fixture()
def receiver(tmp_path, emitted) -> Iterator[WebhookServer]:
    """A receiver that records the events instead of sending them; tag lookups return fixed tags."""
    settings = Settings(state_dir=tmp_path, webhook_port=free_port(), webhook_max_age_s=300)
    lookups = []

    def lookup(name: str, version: str) -> dict:
        lookups.append((name, version))
        return {"s3_uri": "s3://from/mlflow", "sha256": "cd" * 32}

    server = WebhookServer(settings, WEBHOOK_SECRET, emit=emitted.append, tags_lookup=lookup)
    server.lookups = lookups
    yield from running(server)


def test_signed_delivery_emits_the_event(receiver, emitted):
    status, answer = post(receiver, delivery())
    assert status == 200 and answer["status"] == "emitted"
    [event] = emitted
    assert event.event == EVENT_NAME
    assert event.resource.id == "mergeplan.expert.tiny-base.algebra"
    assert event.payload == {"s3_uri": S3_URI, "sha256": SHA, "version": "3"}
    assert str(event.id) == answer["event_id"]


def test_redelivery_carries_the_same_event_id(receiver, emitted):
    post(receiver, delivery(), delivery_id="delivery-1")
    post(receiver, delivery(), delivery_id="delivery-1")
    post(receiver, delivery(), delivery_id="delivery-2")
    assert emitted[0].id == emitted[1].id != emitted[2].id


@pytest.mark.parametrize("attack", ["wrong secret", "unsigned", "stale", "future", "altered body"])
def test_unauthentic_or_stale_delivery_gets_401_and_emits_nothing(receiver, emitted, attack):
    body = delivery()
    if attack == "wrong secret":
        status, answer = post(receiver, body, secret="not-the-secret")
    elif attack == "unsigned":
        status, answer = post(receiver, body, signed=False)
    elif attack == "stale":
        status, answer = post(receiver, body, timestamp=int(time.time()) - 301)
    elif attack == "future":
        status, answer = post(receiver, body, timestamp=int(time.time()) + 301)
    else:
        delivery_id, timestamp = "d", str(int(time.time()))
        signature = _generate_hmac_signature(WEBHOOK_SECRET, delivery_id, timestamp, body.decode())
        forged = delivery(tags={"s3_uri": "s3://evil/x", "sha256": SHA})
        request = urllib.request.Request(
            f"http://127.0.0.1:{receiver.server_address[1]}{receiver.path}", data=forged, method="POST",
            headers={"X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": timestamp,
                     "X-MLflow-Signature": signature})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=30)
        status, answer = error.value.code, json.loads(error.value.read())
    assert status == 401 and answer["error"]
    assert emitted == []


def test_other_models_and_events_are_ignored(receiver, emitted):
    assert post(receiver, delivery(name="merged.tiny-base"))[1]["status"] == "ignored"
    assert post(receiver, delivery(name="expert.tiny-base.algebra.extra"))[1]["status"] == "ignored"
    body = json.dumps({"entity": "model_version_alias", "action": "created", "data": {}}).encode()
    assert post(receiver, body)[1]["status"] == "ignored"
    assert emitted == []


def test_tags_missing_from_the_payload_are_read_from_mlflow(receiver, emitted):
    status, _ = post(receiver, delivery(tags={}))
    assert status == 200 and receiver.lookups == [("expert.tiny-base.algebra", "3")]
    assert emitted[0].payload == {"s3_uri": "s3://from/mlflow", "sha256": "cd" * 32, "version": "3"}


def test_prefect_down_answers_503_so_mlflow_retries(tmp_path):
    settings = Settings(state_dir=tmp_path, webhook_port=free_port(), prefect_api_url=f"http://127.0.0.1:{free_port()}/api")
    for server in running(WebhookServer(settings, WEBHOOK_SECRET)):
        status, answer = post(server, delivery())
        assert status == 503 and "Prefect" in answer["error"]


def test_not_json_is_400(receiver, emitted):
    assert post(receiver, b"not json")[0] == 400 and emitted == []


def test_registration_reaches_prefect_through_mlflow_and_the_receiver(services, stored_base, zoo, prefect_api_url):
    settings = services.model_copy(update={"prefect_api_url": prefect_api_url, "webhook_port": free_port()})
    settings = settings.model_copy(update={"webhook_url": f"http://127.0.0.1:{settings.webhook_port}/mlflow-webhook"})
    for _ in running(WebhookServer(settings, WEBHOOK_SECRET, emit=prefect_emitter(prefect_api_url))):
        ensure_webhook(settings.webhook_url, WEBHOOK_SECRET, settings=settings)
        uri = expert_uri("tiny-base", "chain", settings)
        upload_expert(zoo["experts"][2], uri, settings=settings)
        expert = register_expert(uri, "chain", "tiny-base", settings=settings)
        events = read_events(prefect_api_url, "mergeplan.expert.tiny-base.chain")
    assert [event.payload for event in events] == [{"s3_uri": uri, "sha256": expert.sha256, "version": "1"}]


@pytest.mark.parametrize("exposure", [{"MERGEPLAN_WEBHOOK_HOST": "0.0.0.0"},
                                      {"MERGEPLAN_WEBHOOK_URL": "https://hooks.example.com/mlflow-webhook"}])
def test_receiver_outside_the_local_stack_refuses_to_start_without_a_secret(tmp_path, exposure):
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "MERGEPLAN_WEBHOOK_SECRET"}
    env |= {"MERGEPLAN_STATE_DIR": str(tmp_path), "MERGEPLAN_WEBHOOK_PORT": str(port)} | exposure
    result = subprocess.run([sys.executable, "-m", "infra.webhook"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: MERGEPLAN_WEBHOOK_SECRET is not set")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "stack" / "webhook-secret").exists()  # no secret generated for it either


def test_two_hundred_concurrent_deliveries_half_forged(receiver, emitted):
    """Every valid delivery emits its event exactly once, no forged one emits anything, none is dropped."""
    valid = [str(uuid.uuid4()) for _ in range(100)]
    forged = [str(uuid.uuid4()) for _ in range(100)]
    jobs = [(delivery_id, WEBHOOK_SECRET) for delivery_id in valid] + [(d, "a-guessed-secret") for d in forged]
    jobs = [jobs[i] for i in np.random.default_rng(0).permutation(len(jobs))]
    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(lambda job: (job[0], post(receiver, delivery(), secret=job[1],
                                                           delivery_id=job[0])[0]), jobs))
    by_delivery = dict(statuses)
    assert {by_delivery[d] for d in valid} == {200} and {by_delivery[d] for d in forged} == {401}
    assert len(emitted) == 100
    assert len({event.id for event in emitted}) == 100  # one event per delivery, none twice
