"""How the I/O tasks retry. An error of ours is final: the S3 and MLflow calls inside a task already retried
what can pass with time, and a missing object, a refused request or a bad checksum will not. Anything else (an
unexpected exception) gets IO_RETRIES more tries."""

from __future__ import annotations

from typing import Any

from merging.errors import MergeplanError

IO_RETRIES = 2


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: False for a MergeplanError."""
    try:
        state.result()
    except MergeplanError:
        return False
    except Exception:
        return True
    return True


IO_TASK_OPTIONS: dict[str, Any] = {"retries": IO_RETRIES, "retry_delay_seconds": 2,
                                   "retry_condition_fn": worth_retrying}
