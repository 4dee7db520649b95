"""Cutting a list of examples into disjoint named splits, scaled down when there are too few."""

from __future__ import annotations

from typing import TypeVar

Item = TypeVar("Item")


def scaled_sizes(sizes: dict[str, int], available: int) -> dict[str, int]:
    """Sizes summing to `available` (at least the number of splits): 1 each, the rest shared in proportion to the
    requested sizes, and what rounding leaves over given to the largest split."""
    total = sum(sizes.values())
    spare = available - len(sizes)
    scaled = {name: 1 + size * spare // total for name, size in sizes.items()}
    largest = max(scaled, key=lambda name: scaled[name])
    scaled[largest] += available - sum(scaled.values())
    return scaled


def assign_splits(items: list[Item], sizes: dict[str, int]) -> dict[str, list[Item]]:
    """Disjoint consecutive slices of `items`, smaller splits first, so that evaluation and calibration data stay the
    same when only the training size changes. The caller scales `sizes` down first if items are short."""
    splits, start = {}, 0
    for name in sorted(sizes, key=lambda split: (sizes[split], split)):
        splits[name] = items[start:start + sizes[name]]
        start += sizes[name]
    return {name: splits[name] for name in sizes}
