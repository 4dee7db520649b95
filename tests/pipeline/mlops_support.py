"""Helpers shared by the tests of the stack, the S3 store, the registry and the webhook receiver."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.settings import PREFECT_API_URL, temporary_settings
from pydantic import SecretStr
from safetensors.torch import save_file

from infra.postgres import enterable_temp_folder
from infra.settings import S3_INTERNAL_PORTS, Settings
from infra.stack import free_port_block
from infra.webhook import EVENT_NAME

# The local stack accepts any keys; distinctive ones let tests prove that credentials never leak.
ACCESS_KEY = "AKIAMERGEPLANTESTKEY7"
SECRET_KEY = "mergeplan-test-secret-b7c1f0e2a9d4"
WEBHOOK_SECRET = "mergeplan-test-webhook-secret-5d2e"


def free_port() -> int:
    return free_port_block(1)


def free_s3_port() -> int:
    """A port P with P .. P + S3_INTERNAL_PORTS all free: the SeaweedFS server takes them all."""
    return free_port_block(S3_INTERNAL_PORTS + 1)


def stack_settings(state_dir: Path, **overrides) -> Settings:
    """Settings for a stack in STATE_DIR on free ports, with short S3 retries and the marker credentials; its S3 is
    moto (in memory) unless overridden: most tests want a throwaway store."""
    fields = {"state_dir": state_dir, "s3_server": "moto", "s3_port": free_s3_port(), "mlflow_port": free_port(),
              "prefect_port": free_port(), "webhook_port": free_port(), "s3_attempts": 3, "s3_backoff_s": 0.01,
              "aws_access_key_id": SecretStr(ACCESS_KEY), "aws_secret_access_key": SecretStr(SECRET_KEY),
              "webhook_secret": SecretStr(WEBHOOK_SECRET), "startup_timeout_s": 180}
    return Settings(**fields | overrides)


@contextlib.contextmanager
def postgres_reachable_folder(fallback: Path) -> Iterator[Path]:
    """A folder for a stack's state that the database server's user can enter: a new one when root (PostgreSQL then
    runs as the `postgres` user, to whom pytest's own folders, mode 0700, are closed), else FALLBACK."""
    if os.geteuid() != 0:
        yield fallback
        return
    with enterable_temp_folder("mergeplan-postgres-test-") as root:
        yield root


def one_tensor_checkpoint(folder: Path, megabytes: int, seed: int = 0) -> Path:
    """A checkpoint folder whose single tensor is MEGABYTES large: big enough for multipart transfers."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    save_file({"weight": torch.randn(megabytes * 2**18, generator=generator)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    return folder


def read_events(api_url: str, resource_id: str, timeout_s: float = 60) -> list:
    """The events named EVENT_NAME about RESOURCE_ID in the Prefect server at API_URL, waiting for the first."""
    deadline = time.monotonic() + timeout_s
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            # A new filter each time: its time window ends when it is made, and the event may be younger.
            event_filter = EventFilter(event=EventNameFilter(name=[EVENT_NAME]),
                                       resource=EventResourceFilter(id=[resource_id]))
            events = client.read_events(filter=event_filter, limit=50).events  # the server allows 50
            if events:
                return events
            time.sleep(0.5)
    return []
