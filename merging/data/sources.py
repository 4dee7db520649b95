"""Every domain's data from one call: the user's own files, a synthetic generator, or real text on the machine."""

from __future__ import annotations

import logging
from pathlib import Path

from merging.data.corpora import REAL_TEXT_DOMAINS, real_text_splits
from merging.data.domains import DOMAINS, make_splits
from merging.data.example import Example
from merging.data.loading import load_examples
from merging.data.splits import assign_splits, scaled_sizes
from merging.errors import ConfigError
from merging.seeding import python_rng

log = logging.getLogger("mergeplan")


def user_splits(folder: Path, sizes: dict[str, int], seed: int) -> dict[str, list[Example]]:
    """A folder of .txt/.jsonl files shuffled (seeded) and cut into splits, scaled down when short."""
    examples = load_examples(folder)
    python_rng(seed, folder.name).shuffle(examples)
    if len(examples) < len(sizes):
        raise ConfigError(f"{folder}: {len(examples)} examples, fewer than the {len(sizes)} splits; add data")
    counts = sizes
    if len(examples) < sum(sizes.values()):
        counts = scaled_sizes(sizes, len(examples))
        log.warning("%s: %d examples for %d requested; splits scaled down to %s", folder, len(examples),
                    sum(sizes.values()), counts)
    return assign_splits(examples, counts)


def domain_splits(domain: str, sizes: dict[str, int], seed: int, chunk_chars: int,
                  user_data: Path | None = None) -> dict[str, list[Example]]:
    """The named splits of a domain: USER_DATA/DOMAIN when it exists, else a synthetic or real-text domain.
    {} when a real-text source is absent on this machine (logged)."""
    if user_data is not None and (user_data / domain).exists():
        return user_splits(user_data / domain, sizes, seed)
    if domain in DOMAINS:
        return make_splits(domain, sizes, seed)
    if domain in REAL_TEXT_DOMAINS:
        return real_text_splits(domain, sizes, chunk_chars, seed)
    where = f", or a folder in {user_data}" if user_data is not None else ""
    raise ConfigError(f"unknown domain {domain!r}; choose from the synthetic {', '.join(DOMAINS)}, the real-text "
                      f"{', '.join(REAL_TEXT_DOMAINS)}{where}")
