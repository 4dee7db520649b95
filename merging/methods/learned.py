"""learned coefficients: θ0 + Σk αk,chunk · τk, with α learned by calibration (Expert Merging, EM++).

A tensor is flattened and cut into m contiguous chunks whose sizes differ by at most one entry (the first
numel mod m chunks are one longer), so every requested chunk exists: unlike torch.chunk, none is dropped.
Tensors without coefficients are not merged (the caller copies them from the base).
"""

from __future__ import annotations

import torch

from merging.methods.base import State, WeightedSum


def chunk_split(numel: int, chunks: int) -> tuple[int, int]:
    """(q, r): the first r chunks hold q + 1 entries, the other chunks - r hold q."""
    if not 1 <= chunks <= numel:
        raise ValueError(f"cannot cut {numel} entries into {chunks} chunks")
    return divmod(numel, chunks)


def chunk_sizes(numel: int, chunks: int) -> list[int]:
    q, r = chunk_split(numel, chunks)
    return [q + 1] * r + [q] * (chunks - r)


def combine(task_vectors: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Σk alpha[k, s] · task_vectors[k, chunk s], flat: task_vectors is (K, numel), alpha (K, m).

    Two batched products (long chunks, short chunks): no (K, numel) temporary, so autograd keeps only the
    task vectors it already has for the gradient with respect to alpha.
    """
    experts, numel = task_vectors.shape
    chunks = alpha.shape[1]
    q, r = chunk_split(numel, chunks)
    alpha = alpha.to(task_vectors.dtype)
    head = r * (q + 1)
    parts = []
    if r:
        parts.append(torch.einsum("km,kmc->mc", alpha[:, :r], task_vectors[:, :head].view(experts, r, q + 1)))
    if chunks > r:
        parts.append(torch.einsum("km,kmc->mc", alpha[:, r:], task_vectors[:, head:].view(experts, chunks - r, q)))
    return torch.cat([part.reshape(-1) for part in parts])


class LearnedCoefficients(WeightedSum):
    """Applies coefficients alpha[tensor] of shape (K, chunks) in the streaming merge."""

    name = "learned_coefficients"

    def __init__(self, alpha: dict[str, torch.Tensor]):
        super().__init__(self.Params())
        self.alpha = alpha

    def sparsify(self, delta: torch.Tensor, tensor_name: str, expert_index: int) -> torch.Tensor:
        alpha = self.alpha[tensor_name][expert_index]
        flat = delta.view(-1)
        q, r = chunk_split(flat.numel(), alpha.numel())
        head = r * (q + 1)
        flat[:head].view(r, q + 1).mul_(alpha[:r, None])
        flat[head:].view(alpha.numel() - r, q).mul_(alpha[r:, None])
        return delta

    def add(self, state: State, delta: torch.Tensor, weight: float) -> None:
        state["sum"].add_(delta)  # task weights shaped alpha during calibration: they do not scale it again

    def delta(self, state: State, total_weight: float, base: torch.Tensor) -> torch.Tensor:
        return state["sum"]
