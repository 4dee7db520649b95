"""One training or evaluation example, and its JSON Lines form shared by every data source."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    """A prompt and its worked response; `answer` is the exact final answer, when there is one.

    Real text has an empty prompt and no answer: every token of it is a response token.
    """

    prompt: str
    response: str
    answer: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def write_jsonl(path: Path, examples: list[Example]) -> None:
    """Write examples atomically (a temporary sibling renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(example.to_json() + "\n" for example in examples), encoding="utf-8")
    partial.replace(path)
