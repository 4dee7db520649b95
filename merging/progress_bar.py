"""Progress bars for the long commands (zoo build, sweep, merge, calibration, download): drawn on a terminal
only. Where stderr is not a TTY (CI, a log file, a Prefect worker) nothing is drawn and the log lines stay the
only report."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], description: str, unit: str, total: int | None = None) -> Iterator[T]:
    """ITEMS, with a bar on stderr while they are consumed when stderr is a terminal; cleared when done."""
    return iter(tqdm(items, desc=description, unit=unit, total=total, disable=None, leave=False,
                     dynamic_ncols=True))
