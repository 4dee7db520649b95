"""Expert Merging++: spend the coefficient budget on the tensors that matter.

Importance Iℓ = Σk |αkℓ| · ‖τkℓ‖₁ (ℓ1-normalised over tensors), from the stage-1 coefficients; tensor ℓ
gets mℓ = floor(B · L · Iℓ^κ / Σj Ij^κ) chunks (at most its entry count). mℓ = 0 keeps one fixed coefficient.
"""

from __future__ import annotations

import math

import torch


def importance(alpha: dict[str, torch.Tensor], task_vector_l1: dict[str, torch.Tensor]) -> dict[str, float]:
    """alpha[tensor]: (K, 1) stage-1 coefficients; task_vector_l1[tensor]: (K,) ‖τkℓ‖₁. Sums to 1."""
    raw = {name: float((alpha[name][:, 0].abs() * task_vector_l1[name]).sum()) for name in alpha}
    total = sum(raw.values())
    return {name: value / total if total > 0 else 1 / len(raw) for name, value in raw.items()}


def allocate_chunks(scores: dict[str, float], numel: dict[str, int], budget: float, kappa: float) -> dict[str, int]:
    """Chunks per tensor: floor(B · L · I^κ / Σ I^κ), capped at the tensor's entry count."""
    powered = {name: score**kappa for name, score in scores.items()}
    total = sum(powered.values())
    tensors = len(scores)
    return {name: min(numel[name], math.floor(budget * tensors * value / total)) for name, value in powered.items()}
