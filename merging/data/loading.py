"""Loading examples from JSON Lines or text files (through `datasets`), and tokenising them with masks.

A domain's data is a file or a folder of .jsonl / .txt files. JSON Lines rows are either
{"prompt", "response", "answer"?} or {"text"}; a .txt file is split into paragraphs. Text without a
prompt is all response: every one of its tokens counts in the loss and in evaluation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.data.example import Example
from merging.errors import ConfigError

log = logging.getLogger("mergeplan")
SPLITS = ("train", "calib", "eval")
DATA_SUFFIXES = (".jsonl", ".txt")
IGNORE_INDEX = -100  # label of tokens that do not count in the loss


def data_files(path: Path) -> list[Path]:
    """The .jsonl/.txt files at `path` (a file, or a folder searched recursively), sorted."""
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise ConfigError(f"{path}: not a .jsonl or .txt data file")
        return [path]
    if not path.is_dir():
        raise ConfigError(f"{path}: no such data file or folder")
    files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{path}: no .jsonl or .txt files in this folder")
    return files


def _rows_to_examples(rows: list[dict], source: Path) -> list[Example]:
    examples = []
    for number, row in enumerate(rows, start=1):
        if row.get("response") is not None:
            examples.append(Example(row.get("prompt") or "", row["response"], row.get("answer")))
        elif row.get("text") is not None:
            examples.append(Example("", row["text"]))
        else:
            raise ConfigError(f"{source}: row {number} has neither 'response' nor 'text'")
    return examples


def load_examples(path: str | Path) -> list[Example]:
    """Every example in a data file or folder, in file order; empty text is dropped."""
    import datasets

    datasets.disable_progress_bars()
    examples: list[Example] = []
    for file in data_files(Path(path)):
        if file.stat().st_size == 0:
            raise ConfigError(f"{file}: empty data file")
        try:
            if file.suffix == ".jsonl":
                rows = datasets.load_dataset("json", data_files=str(file), split="train").to_list()
            else:
                rows = datasets.load_dataset("text", data_files=str(file), sample_by="paragraph",
                                             split="train").to_list()
        except Exception as exc:  # datasets wraps parse errors in several types
            raise ConfigError(f"{file}: cannot be read as {file.suffix[1:]} ({str(exc).splitlines()[0]})") from exc
        examples += [e for e in _rows_to_examples(rows, file) if e.response.strip()]
    if not examples:
        raise ConfigError(f"{path}: no text in these data files")
    return examples


def load_split(data_dir: str | Path, domain: str, split: str) -> list[Example]:
    """A domain's split from a zoo data folder: DATA_DIR/DOMAIN/SPLIT.jsonl (or SPLIT/ as a folder)."""
    folder = Path(data_dir) / domain
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no data for domain {domain!r}")
    for candidate in (folder / f"{split}.jsonl", folder / split, folder / f"{split}.txt"):
        if candidate.exists():
            return load_examples(candidate)
    raise ConfigError(f"{folder}: no {split}.jsonl (splits are {', '.join(SPLITS)})")


def data_domains(data_dir: str | Path) -> list[str]:
    """The domains of a data folder: its subfolders, sorted."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such data folder")
    domains = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not domains:
        raise ConfigError(f"{folder}: no domain folders (expected DATA/DOMAIN/eval.jsonl)")
    return domains


@dataclass(frozen=True)
class Encoded:
    """Token ids and which of them are response tokens (the ones that count)."""

    ids: list[int]
    response_mask: list[bool]


def encode(tokenizer, example: Example, max_length: int) -> Encoded:
    """BOS (when the tokenizer has one) + prompt + response + EOS; only response and EOS tokens are marked.
    Truncated to max_length."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    prompt = tokenizer.encode(example.prompt, add_special_tokens=False) if example.prompt else []
    response = tokenizer.encode(example.response, add_special_tokens=False)
    ids = [*bos, *prompt, *response, tokenizer.eos_token_id]
    mask = [False] * (len(bos) + len(prompt)) + [True] * (len(response) + 1)
    return Encoded(ids[:max_length], mask[:max_length])


def collate(batch: list[Encoded], pad_id: int, all_tokens: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence; labels are IGNORE_INDEX outside the response (or padding only)."""
    length = max(len(e.ids) for e in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for row, encoded in enumerate(batch):
        ids = torch.tensor(encoded.ids)
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        counted = torch.ones(len(ids), dtype=torch.bool) if all_tokens else torch.tensor(encoded.response_mask)
        labels[row, : len(ids)] = torch.where(counted, ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
