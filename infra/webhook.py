"""Receiver for MLflow registry webhooks: a signed `model_version.created` of `expert.BASE.DOMAIN` becomes the
Prefect event `mergeplan.expert.registered` (resource `mergeplan.expert.BASE.DOMAIN`, payload s3_uri, sha256,
version), which triggers the `on-new-expert` deployment.

MLflow signs each delivery: X-MLflow-Signature = "v1," + base64(HMAC-SHA256(secret, "{delivery id}.{timestamp}.
{body}")). A request with a missing or wrong signature, or a timestamp outside the freshness window (a replay),
gets 401 and emits nothing. The event is confirmed by the Prefect server before the receiver answers 200; when
Prefect is down the answer is 503, so MLflow retries the delivery. Its retries carry the same delivery id, from
which the event id is derived, so Prefect stores the event once.

Run it with `python -m infra.webhook` (mergeplan up does); settings come from the environment (infra/README.md).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prefect.events import Event

from infra.errors import StackError
from infra.settings import LOOPBACK, WEBHOOK_PATH, Settings, redact_url, resolve_webhook_secret
from merging.errors import MergeplanError

log = logging.getLogger("mergeplan.webhook")

EVENT_NAME = "mergeplan.expert.registered"
MAX_BODY_BYTES = 1 << 20
_EXPERT_MODEL = re.compile(r"^expert\.([A-Za-z0-9][A-Za-z0-9_-]*)\.([A-Za-z0-9][A-Za-z0-9_-]*)$")
# Event ids are derived from delivery ids in this namespace, so a redelivery is the same event.
_EVENT_ID_NAMESPACE = uuid.UUID("5f1b7e0c-6a43-4d0a-9a55-2f1f0c6e8b11")

Emitter = Callable[[Event], None]
TagsLookup = Callable[[str, str], Mapping[str, str]]


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The X-MLflow-Signature value MLflow sends for this delivery."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_problem(secret: str, headers: Mapping[str, str], body: bytes, *, max_age_s: float,
                      now: float | None = None) -> str | None:
    """Why this delivery must be refused, or None when it is authentic and fresh."""
    delivery_id = headers.get("X-MLflow-Delivery-Id")
    timestamp = headers.get("X-MLflow-Timestamp")
    signature = headers.get("X-MLflow-Signature")
    if not (delivery_id and timestamp and signature):
        return "missing X-MLflow-Delivery-Id, X-MLflow-Timestamp or X-MLflow-Signature"
    try:
        age = (time.time() if now is None else now) - int(timestamp)
    except ValueError:
        return f"timestamp {timestamp[:20]!r} is not a Unix time"
    if abs(age) > max_age_s:
        return f"timestamp is {age:.0f} s old, outside the {max_age_s:.0f} s window (a replay, or clocks disagree)"
    if not hmac.compare_digest(sign(secret, delivery_id, timestamp, body).encode(), signature.encode()):
        return "signature does not match (a different webhook secret?)"
    return None


def expert_event(delivery: Mapping, delivery_id: str, tags_lookup: TagsLookup) -> Event | None:
    """The Prefect event for a model_version.created delivery of an expert model; None for anything else."""
    if delivery.get("entity") != "model_version" or delivery.get("action") != "created":
        return None
    data = delivery.get("data") or {}
    name, version = str(data.get("name", "")), str(data.get("version", ""))
    match = _EXPERT_MODEL.match(name)
    if not match or not version:
        return None
    base, domain = match.groups()
    tags = data.get("tags") or {}
    if not (tags.get("s3_uri") and tags.get("sha256")):
        tags = tags_lookup(name, version)
    return Event(
        event=EVENT_NAME,
        resource={"prefect.resource.id": f"mergeplan.expert.{base}.{domain}", "prefect.resource.name": name,
                  "mergeplan.base": base, "mergeplan.domain": domain},
        payload={"s3_uri": tags.get("s3_uri", ""), "sha256": tags.get("sha256", ""), "version": version},
        id=uuid.uuid5(_EVENT_ID_NAMESPACE, delivery_id))


def prefect_emitter(api_url: str) -> Emitter:
    """Emits to the Prefect server (or Cloud, with PREFECT_API_KEY) at API_URL and waits for its confirmation."""
    def emit(event: Event) -> None:
        asyncio.run(_emit_confirmed(event, api_url))

    return emit


async def _emit_confirmed(event: Event, api_url: str) -> None:
    from prefect.events.clients import get_events_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        # checkpoint_every=1: each emit waits for the server's pong, so an answered 200 means Prefect has it.
        client = get_events_client(reconnection_attempts=2, checkpoint_every=1)
    async with client:
        await client.emit(event)


def mlflow_tags_lookup(settings: Settings) -> TagsLookup:
    def lookup(model_name: str, version: str) -> Mapping[str, str]:
        from infra.registry import expert_version_tags

        return expert_version_tags(model_name, version, settings=settings)

    return lookup


class WebhookServer(ThreadingHTTPServer):
    """The receiver; EMIT and TAGS_LOOKUP are replaceable so that tests can watch what it would send."""

    daemon_threads = True
    # socketserver's default listen backlog is 5: a burst of 50 concurrent deliveries had connections reset
    request_queue_size = 1024

    def __init__(self, settings: Settings, secret: str, emit: Emitter | None = None,
                 tags_lookup: TagsLookup | None = None, port: int | None = None):
        self.settings = settings
        self.secret = secret
        self.emit = emit or prefect_emitter(settings.prefect_api_url)
        self.tags_lookup = tags_lookup or mlflow_tags_lookup(settings)
        self.path = urlsplit(settings.webhook_url).path or WEBHOOK_PATH
        super().__init__((settings.webhook_host, settings.webhook_port if port is None else port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: WebhookServer

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/health":
            self._answer(HTTPStatus.OK, {"status": "ok"})
        else:
            self._answer(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def do_POST(self) -> None:
        if urlsplit(self.path).path != self.server.path:
            self._answer(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
            return
        body = self.rfile.read(length)
        problem = signature_problem(self.server.secret, self.headers, body,
                                    max_age_s=self.server.settings.webhook_max_age_s)
        if problem:
            log.warning("refused a delivery from %s: %s", self.client_address[0], problem)
            self._answer(HTTPStatus.UNAUTHORIZED, {"error": problem})
            return
        try:
            delivery = json.loads(body)
            event = expert_event(delivery, self.headers["X-MLflow-Delivery-Id"], self.server.tags_lookup)
        except (ValueError, AttributeError) as exc:
            self._answer(HTTPStatus.BAD_REQUEST, {"error": f"not an MLflow webhook payload ({exc})"})
            return
        except Exception as exc:  # the MLflow tag lookup: let MLflow retry the delivery later
            log.error("delivery %s: cannot read the version's tags: %s", self.headers["X-MLflow-Delivery-Id"], exc)
            self._answer(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "cannot read the version's tags"})
            return
        if event is None:
            self._answer(HTTPStatus.OK, {"status": "ignored"})
            return
        try:
            self.server.emit(event)
        except Exception as exc:  # Prefect unreachable: 503 makes MLflow deliver again
            log.error("event %s for %s not emitted: %s", event.id, event.resource.id, exc)
            self._answer(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "Prefect did not take the event"})
            return
        log.info("emitted %s for %s version %s (event %s)", EVENT_NAME, event.resource.id,
                 event.payload["version"], event.id)
        self._answer(HTTPStatus.OK, {"status": "emitted", "event_id": str(event.id)})

    def _answer(self, status: HTTPStatus, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.client_address[0], format % args)


def receiver_secret(settings: Settings) -> str:
    """The HMAC secret; generated only for the local stack's loopback receiver. Anywhere else a generated secret
    would let through only what MLflow was never told to sign, or invite running without one: it must be set."""
    if settings.webhook_secret is None and (settings.webhook_host != LOOPBACK or not settings.is_local("webhook")):
        raise StackError(f"MERGEPLAN_WEBHOOK_SECRET is not set: the receiver at {redact_url(settings.webhook_url)} "
                         f"(listening on {settings.webhook_host}) is outside the local stack and refuses to start "
                         "without the secret MLflow's webhook signs with; set it to that secret")
    return resolve_webhook_secret(settings)


def serve(settings: Settings) -> None:
    """Run the receiver until SIGTERM or Ctrl-C."""
    server = WebhookServer(settings, receiver_secret(settings))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    log.info("listening on http://%s:%d%s, emitting to %s", settings.webhook_host, server.server_address[1],
             server.path, redact_url(settings.prefect_api_url))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(Settings.from_env())
    except MergeplanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
