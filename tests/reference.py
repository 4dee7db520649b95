"""The merge methods written straight from shared/specs/merge_methods.md on stacked tensors.

Deliberately naive (a stable sort for trimming, whole stacks in memory): the streaming folds in
merging/methods must agree with these.
"""

import torch

from merging.seeding import generator


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    keep = max(1, int(density * delta.numel()))  # a positive density keeps one entry at least (mergekit's rule)
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
    elected = torch.where((w * stacked).sum(0) >= 0, 1.0, -1.0)  # a zero sum elects + (mergekit's rule)
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


def outlier_trim(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    numel = delta.numel()
    keep = int(density * numel)
    outliers = min(int(gamma * numel), numel - keep)
    order = torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[order[outliers:outliers + keep]] = True
    return torch.where(mask.view(delta.shape), delta, 0.0)


def breadcrumbs(base, experts, weights, density, gamma, scale=1.0, normalize=False):
    trimmed = [base + outlier_trim(e - base, density, gamma) for e in experts]
    return linear(base, trimmed, weights, scale, normalize)


def breadcrumbs_ties(base, experts, weights, density, gamma, scale=1.0):
    return disjoint_merge(base, [outlier_trim(e - base, density, gamma) for e in experts], weights, scale)


def magprune(delta: torch.Tensor, density: float, epsilon: float, seed: int, name: str, index: int) -> torch.Tensor:
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    draws = torch.rand(rows.shape, generator=generator(seed, name, index))
    out = torch.zeros_like(rows)
    n = rows.shape[1]
    for r in range(rows.shape[0]):
        order = torch.argsort(rows[r].abs(), stable=True)  # order[j] has rank j + 1
        for j, column in enumerate(order.tolist()):
            p = density - epsilon + 2 * epsilon * j / (n - 1) if n > 1 else density
            if draws[r, column] < p:
                out[r, column] = rows[r, column] / p
    return out.reshape(delta.shape)


def della(base, experts, weights, density, epsilon, seed, name, scale=1.0):
    deltas = [magprune(e - base, density, epsilon, seed, name, i) for i, e in enumerate(experts)]
    return disjoint_merge(base, deltas, weights, scale)


def della_linear(base, experts, weights, density, epsilon, seed, name, scale=1.0, normalize=False):
    dropped = [base + magprune(e - base, density, epsilon, seed, name, i) for i, e in enumerate(experts)]
    return linear(base, dropped, weights, scale, normalize)


def model_stock(base, experts, filter_wise=False):
    """Model Stock with the mean pairwise cosine (per tensor, or per row with filter_wise)."""
    flat = (lambda t: t.reshape(t.shape[0], -1)) if filter_wise and base.dim() >= 2 else (lambda t: t.reshape(1, -1))
    deltas = [flat(e - base).double() for e in experts]
    cosines = [torch.nn.functional.cosine_similarity(deltas[i], deltas[j], dim=1, eps=1e-30)
               for i in range(len(deltas)) for j in range(i + 1, len(deltas))]
    c = torch.stack(cosines).mean(0).unsqueeze(1)
    k = len(experts)
    t = k * c / (1 + (k - 1) * c)
    mean = torch.stack(deltas).mean(0)
    return base + (t * mean).reshape(base.shape).float()


def slerp(base, expert, t):
    """mergekit's formula: the angle between the normalised tensors, linear where they are almost colinear."""
    v0, v1 = base.double().reshape(-1), expert.double().reshape(-1)
    dot = float((v0 / v0.norm()) @ (v1 / v1.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * base.double() + t * expert.double()).float()
    theta = torch.tensor(dot).acos()
    s0, s1 = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    return (s0 * base.double() + s1 * expert.double()).float()
