"""Sparsifiers shared by the methods: exact top-k magnitude trimming and seeded DARE dropping.

`rescale` has each family's meaning, as mergekit's: a magnitude trim scales what it keeps back to the task vector's
L1 norm (unless either norm is below 1e-7); a random drop divides each kept entry by its keep probability.
"""

import torch

from merging.seeding import generator

_BUCKET_SHIFT = 16  # radix select on the top 16 bits of the float32 magnitudes
RESCALE_EPS = 1e-7


def _rescaled_(delta: torch.Tensor, mask: torch.Tensor, rescale: bool) -> torch.Tensor:
    """In place: DELTA masked, and with RESCALE scaled back to its L1 norm before the mask."""
    before = float(delta.abs().sum()) if rescale else 0.0
    delta.mul_(mask.view(delta.shape))
    if rescale:
        after = float(delta.abs().sum())
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            delta.mul_(before / after)
    return delta


def top_magnitude_mask(magnitudes: torch.Tensor, keep: int) -> torch.Tensor:
    """A mask of exactly `keep` entries of a flat, finite, non-negative float32 tensor: those above the
    keep-th largest value, then those equal to it in index order (what a stable descending sort keeps).

    Radix select instead of a sort: a histogram of the top bits of the IEEE representation (monotone for
    non-negative floats) finds the bucket holding the threshold; only that bucket is searched exactly.
    """
    buckets = magnitudes.view(torch.int32) >> _BUCKET_SHIFT
    counts = torch.bincount(buckets)
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # entries in bucket b or higher
    bucket = int(torch.searchsorted(-at_or_above, torch.tensor(-keep), right=True)) - 1
    above_bucket = int(at_or_above[bucket + 1]) if bucket + 1 < len(counts) else 0
    mask = buckets > bucket
    positions = torch.nonzero(buckets == bucket).squeeze(1)
    candidates = magnitudes[positions]
    # a stable descending order of the bucket's entries, then its first (keep - above_bucket)
    order = torch.argsort(candidates, descending=True, stable=True)
    mask[positions[order[: keep - above_bucket]]] = True
    return mask


def magnitude_trim_(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """In place: keep the max(1, int(density·numel)) entries of largest magnitude, zero the rest."""
    if density >= 1 or delta.numel() == 0:
        return delta
    keep = max(1, int(density * delta.numel()))
    if keep >= delta.numel():
        return delta
    return _rescaled_(delta, top_magnitude_mask(delta.abs().reshape(-1), keep), rescale)


def dare_drop_(delta: torch.Tensor, density: float, seed: int, tensor_name: str, expert_index: int,
               rescale: bool = True) -> torch.Tensor:
    """In place: keep each entry with probability `density` and (RESCALE) divide the kept ones by it (DARE)."""
    if density >= 1:
        return delta
    kept = torch.rand(delta.shape, generator=generator(seed, tensor_name, expert_index)) < density
    return (delta.div_(density) if rescale else delta).mul_(kept)


def outlier_trim_(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """In place (Model Breadcrumbs): zero the int(gamma·numel) entries of largest magnitude, then keep the
    int(density·numel) largest of the rest; when the two fractions exceed 1, fewer outliers are cut."""
    numel = delta.numel()
    keep = int(density * numel)
    outliers = min(int(gamma * numel), numel - keep)
    if keep == 0:
        return delta.zero_()
    magnitudes = delta.abs().reshape(-1)
    mask = top_magnitude_mask(magnitudes, keep + outliers) if keep + outliers < numel else \
        torch.ones(numel, dtype=torch.bool)
    if outliers:
        mask &= ~top_magnitude_mask(magnitudes, outliers)
    return _rescaled_(delta, mask, rescale)


def della_drop_(delta: torch.Tensor, density: float, epsilon: float, seed: int, tensor_name: str,
                expert_index: int, rescale: bool = True) -> torch.Tensor:
    """In place (DELLA's MagPrune): in each row (first dimension; a vector is one row), the entry of magnitude
    rank r among n (1 = smallest) is kept with probability p = density - epsilon + 2·epsilon·(r - 1)/(n - 1)
    (density when n = 1) and (RESCALE) divided by p when kept, so each entry keeps its expected value."""
    if density >= 1:
        return delta
    rows = delta.view(1, -1) if delta.dim() < 2 else delta.view(delta.shape[0], -1)
    width = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(rows).scatter_(1, order, torch.arange(width, dtype=rows.dtype).expand_as(rows))
    spread = ranks.div_(width - 1).mul_(2 * epsilon) if width > 1 else ranks.fill_(epsilon)
    keep_probability = spread.add_(density - epsilon)
    kept = torch.rand(rows.shape, generator=generator(seed, tensor_name, expert_index)) < keep_probability
    (rows.div_(keep_probability) if rescale else rows).mul_(kept)
    return delta
