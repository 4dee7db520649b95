"""Expert Merging++: spend the coefficient budget on the tensors that matter.

Importance Iℓ = Σk |αkℓ| · ‖τkℓ‖₁ (ℓ1-normalised over tensors), from the stage-1 coefficients; tensor ℓ
gets mℓ = floor(B · L · Iℓ^κ / Σj Ij^κ) chunks, blocks of whole rows, so at most its row count (a linear layer's
output rows): a tensor the budget would cut finer is capped there, with a warning naming it. mℓ = 0 keeps one
fixed coefficient.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger("mergeplan")


def importance(alpha: dict[str, torch.Tensor], task_vector_l1: dict[str, torch.Tensor]) -> dict[str, float]:
    """alpha[tensor]: (K, 1) stage-1 coefficients; task_vector_l1[tensor]: (K,) ‖τkℓ‖₁. Sums to 1."""
    raw = {name: float((alpha[name][:, 0].abs() * task_vector_l1[name]).sum()) for name in alpha}
    total = sum(raw.values())
    return {name: value / total if total > 0 else 1 / len(raw) for name, value in raw.items()}


def allocate_chunks(scores: dict[str, float], rows: dict[str, int], budget: float, kappa: float) -> dict[str, int]:
    """Chunks per tensor: floor(B · L · I^κ / Σ I^κ), capped at the tensor's row count."""
    powered = {name: score**kappa for name, score in scores.items()}
    total = sum(powered.values())
    tensors = len(scores)
    asked = {name: math.floor(budget * tensors * value / total) for name, value in powered.items()}
    capped = sorted((name for name in asked if asked[name] > rows[name]), key=lambda n: rows[n] - asked[n])
    if capped:
        name = capped[0]
        log.warning("params.budget %.3g asks %d chunks of %s, which has %d rows: chunks are blocks of whole rows "
                    "(so a LoRA expert's update stays factored), so %d tensor(s) were capped at their row count; "
                    "lower params.budget or params.kappa to spend the budget elsewhere",
                    budget, asked[name], name, rows[name], len(capped))
    return {name: min(rows[name], count) for name, count in asked.items()}
