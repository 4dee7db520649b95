"""The merge methods written straight from shared/specs/merge_methods.md on stacked tensors.

Deliberately naive (a stable sort for trimming, whole stacks in memory): the streaming folds in
merging/methods must agree with these.
"""

import torch

from merging.seeding import generator


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    keep = int(density * delta.numel())
    order = torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)
    mask = torch.zeros(delta.numel(), dtype=torch.bool)
    mask[order[:keep]] = True
    return torch.where(mask.view(delta.shape), delta, 0.0)


def dare(delta: torch.Tensor, density: float, seed: int, name: str, index: int) -> torch.Tensor:
    kept = torch.rand(delta.shape, generator=generator(seed, name, index)) < density
    return torch.where(kept, delta / density, 0.0)


def linear(base, experts, weights, scale=1.0, normalize=False):
    w = torch.tensor(weights).view(-1, *[1] * base.dim())
    total = (w * torch.stack([e - base for e in experts])).sum(0)
    return base + scale * (total / sum(weights) if normalize else total)


def average(base, experts, weights):
    return linear(base, experts, weights, 1.0, normalize=True)


def disjoint_merge(base, deltas, weights, scale):
    stacked = torch.stack(deltas)
    w = torch.tensor(weights).view(-1, *[1] * base.dim())
    elected = torch.sign((w * stacked).sum(0))
    agrees = (torch.sign(stacked) == elected) & (stacked != 0)
    numerator = (w * agrees * stacked).sum(0)
    denominator = (w * agrees).sum(0)
    merged = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-30), 0.0)
    return base + scale * merged


def ties(base, experts, weights, density, scale=1.0):
    return disjoint_merge(base, [trim(e - base, density) for e in experts], weights, scale)


def dare_linear(base, experts, weights, density, seed, name, scale=1.0, normalize=False):
    dropped = [base + dare(e - base, density, seed, name, i) for i, e in enumerate(experts)]
    return linear(base, dropped, weights, scale, normalize)


def dare_ties(base, experts, weights, density, seed, name, scale=1.0):
    deltas = [dare(e - base, density, seed, name, i) for i, e in enumerate(experts)]
    return disjoint_merge(base, deltas, weights, scale)
