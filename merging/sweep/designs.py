"""Subset designs of a sweep: which subsets of a pool of M experts are measured at each k = 1 … M.

A subset is a set: prefixes or windows that repeat one are kept once.
- all: every C(M, k) subset where that count is at most `max_subsets`, otherwise the length-k prefixes of
  `max_subsets` diverse permutations (the paper's recipe);
- diverse: the length-k prefixes of `max_subsets` (default M) diverse permutations, for every k;
- balanced: the M cyclic windows of length k over a seeded shuffle of the experts, so that each expert is in
  exactly k of the M subsets (what the per-domain fits need).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Literal

import numpy as np

from merging.errors import ConfigError
from merging.seeding import derived_seed

Design = Literal["all", "diverse", "balanced"]
PERMUTATION_CANDIDATES = 1000
MAX_UNCAPPED_SUBSETS = 10_000  # beyond this, "every subset" is a mistake rather than a plan: ask for a cap

Subset = tuple[int, ...]  # global expert indices, ascending


def all_subsets(pool_size: int, k: int) -> list[Subset]:
    return list(itertools.combinations(range(pool_size), k))


def diverse_permutations(pool_size: int, count: int, seed: int,
                         candidates: int = PERMUTATION_CANDIDATES) -> list[tuple[int, ...]]:
    """The paper's diverse permutations: 0 … M−1 and its reverse, then, one at a time, the one of `candidates`
    seeded random shuffles whose smallest Hamming distance to those already chosen is largest."""
    rng = np.random.default_rng(derived_seed(seed, "diverse-permutations", pool_size))
    identity = np.arange(pool_size)
    chosen = [identity, identity[::-1]][:count]
    while len(chosen) < count:
        shuffles = rng.permuted(np.tile(identity, (candidates, 1)), axis=1)
        distance = (shuffles[:, None, :] != np.stack(chosen)[None]).sum(axis=2).min(axis=1)
        chosen.append(shuffles[int(np.argmax(distance))])
    return [tuple(int(i) for i in permutation) for permutation in chosen]


def prefix_subsets(permutations: list[tuple[int, ...]], k: int) -> list[Subset]:
    return _distinct(tuple(sorted(permutation[:k])) for permutation in permutations)


def balanced_subsets(pool_size: int, k: int, seed: int) -> list[Subset]:
    """The M cyclic windows of length k over a seeded shuffle: each expert is in exactly k of them."""
    order = np.random.default_rng(derived_seed(seed, "balanced", pool_size, k)).permutation(pool_size)
    return _distinct(tuple(sorted(int(order[(start + offset) % pool_size]) for offset in range(k)))
                     for start in range(pool_size))


def _distinct(subsets: Iterator[Subset]) -> list[Subset]:
    return list(dict.fromkeys(subsets))


def design_subsets(design: Design, pool_size: int, max_subsets: int | None, seed: int) -> dict[int, list[Subset]]:
    """The subsets to measure at each k = 1 … M, in measurement order."""
    if pool_size < 1:
        raise ConfigError("a sweep needs at least one expert")
    ks = range(1, pool_size + 1)
    if design == "balanced":
        if max_subsets is not None and max_subsets < pool_size:
            raise ConfigError(f"max_subsets: the balanced design has M = {pool_size} subsets per k by construction; "
                              f"drop the cap or choose the all or diverse design")
        return {k: balanced_subsets(pool_size, k, seed) for k in ks}
    if design == "diverse":
        permutations = diverse_permutations(pool_size, max_subsets or pool_size, seed)
        return {k: prefix_subsets(permutations, k) for k in ks}
    if design != "all":
        raise ConfigError(f"design: unknown design {design!r}; choose all, diverse or balanced")
    if max_subsets is None:
        total = 2**pool_size - 1
        if total > MAX_UNCAPPED_SUBSETS:
            raise ConfigError(f"max_subsets: {pool_size} experts have {total} subsets; set a cap per k "
                              f"(e.g. --max-subsets 50)")
        return {k: all_subsets(pool_size, k) for k in ks}
    permutations = diverse_permutations(pool_size, max_subsets, seed)
    return {k: all_subsets(pool_size, k) if math.comb(pool_size, k) <= max_subsets
            else prefix_subsets(permutations, k) for k in ks}
