"""Sparsifiers shared by the methods: exact top-k magnitude trimming and seeded DARE dropping."""

import torch

from merging.seeding import generator

_BUCKET_SHIFT = 16  # radix select on the top 16 bits of the float32 magnitudes


def top_magnitude_mask(magnitudes: torch.Tensor, keep: int) -> torch.Tensor:
    """A mask of exactly `keep` entries of a flat, finite, non-negative float32 tensor: those above the
    keep-th largest value, then those equal to it in index order (what a stable descending sort keeps).

    Radix select instead of a sort: a histogram of the top bits of the IEEE representation (monotone for
    non-negative floats) finds the bucket holding the threshold, and only that bucket is searched exactly.
    """
    buckets = magnitudes.view(torch.int32) >> _BUCKET_SHIFT
    counts = torch.bincount(buckets)
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # entries in bucket b or higher
    bucket = int(torch.searchsorted(-at_or_above, torch.tensor(-keep), right=True)) - 1
    above_bucket = int(at_or_above[bucket + 1]) if bucket + 1 < len(counts) else 0
    candidates = magnitudes[buckets == bucket]
    still_needed = keep - above_bucket
    threshold = torch.kthvalue(candidates, candidates.numel() - still_needed + 1).values
    above = above_bucket + int((candidates > threshold).sum())
    equal = int((candidates == threshold).sum())
    if above + equal == keep:
        return magnitudes >= threshold
    mask = magnitudes > threshold
    ties = torch.nonzero(magnitudes == threshold).squeeze(1)[: keep - above]
    mask[ties] = True
    return mask


def magnitude_trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·numel) entries of largest magnitude, zero the rest."""
    keep = int(density * delta.numel())
    if keep >= delta.numel():
        return delta
    if keep == 0:
        return torch.zeros_like(delta)
    mask = top_magnitude_mask(delta.abs().reshape(-1), keep)
    return torch.where(mask.view(delta.shape), delta, 0.0)


def dare_drop(delta: torch.Tensor, density: float, seed: int, tensor_name: str,
              expert_index: int) -> torch.Tensor:
    """Keep each entry with probability `density` and divide the kept ones by it (DARE)."""
    if density >= 1:
        return delta
    kept = torch.rand(delta.shape, generator=generator(seed, tensor_name, expert_index)) < density
    return torch.where(kept, delta / density, 0.0)
