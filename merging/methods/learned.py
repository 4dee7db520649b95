"""learned coefficients: θ0 + Σk αk,chunk · τk, with α learned by calibration (Expert Merging, EM++).

A tensor's chunks are blocks of whole rows (its first dimension): m chunks cut the rows into m blocks whose
row counts differ by at most one (the first rows mod m blocks are one row longer), so every requested chunk
exists (unlike torch.chunk, none is dropped) and a chunk of a linear layer's weight is a block of output
rows: the same chunk scales rows of a LoRA expert's B, which keeps calibration of adapters factored. In the
flattened tensor a row block is a contiguous run, as the paper's chunks are. A 1-D tensor's rows are its entries.
Tensors without coefficients are not merged (the caller copies them from the base).
"""

from __future__ import annotations

import math

import torch

from merging.methods.base import State, WeightedSum


def row_length(shape: torch.Size | tuple[int, ...]) -> int:
    """Entries per row: the product of every dimension after the first (1 for a 1-D tensor)."""
    return math.prod(shape[1:])


def chunk_split(rows: int, chunks: int) -> tuple[int, int]:
    """(q, r): the first r row blocks hold q + 1 rows, the other chunks - r hold q."""
    if not 1 <= chunks <= rows:
        raise ValueError(f"cannot cut {rows} rows into {chunks} blocks of whole rows")
    return divmod(rows, chunks)


def chunk_sizes(rows: int, chunks: int) -> list[int]:
    """Rows per block."""
    q, r = chunk_split(rows, chunks)
    return [q + 1] * r + [q] * (chunks - r)


def row_coefficients(alpha: torch.Tensor, rows: int) -> torch.Tensor:
    """(K, m) block coefficients -> (K, rows): each row's coefficient."""
    sizes = torch.tensor(chunk_sizes(rows, alpha.shape[1]), device=alpha.device)
    return alpha.repeat_interleave(sizes, dim=1, output_size=rows)


def combine(task_vectors: torch.Tensor, alpha: torch.Tensor, row: int = 1) -> torch.Tensor:
    """Σk alpha[k, s] · task_vectors[k, block s], flat: task_vectors is (K, numel) of rows of `row` entries,
    alpha (K, m).

    Two batched products (long blocks, short blocks): no (K, numel) temporary, so autograd keeps only the
    task vectors it already has for the gradient with respect to alpha.
    """
    experts, numel = task_vectors.shape
    chunks = alpha.shape[1]
    q, r = chunk_split(numel // row, chunks)
    alpha = alpha.to(task_vectors.dtype)
    head = r * (q + 1) * row
    parts = []
    if r:
        parts.append(torch.einsum("km,kmc->mc", alpha[:, :r],
                                  task_vectors[:, :head].view(experts, r, (q + 1) * row)))
    if chunks > r:
        parts.append(torch.einsum("km,kmc->mc", alpha[:, r:],
                                  task_vectors[:, head:].view(experts, chunks - r, q * row)))
    return torch.cat([part.reshape(-1) for part in parts])


def combine_transpose(task_vectors: torch.Tensor, gradient: torch.Tensor, chunks: int, row: int = 1) -> torch.Tensor:
    """The adjoint of combine: (K, m) with entry [k, s] = ⟨gradient[block s], task_vectors[k, block s]⟩, the
    gradient of a loss with respect to alpha given its gradient (numel,) with respect to the combined tensor."""
    experts, numel = task_vectors.shape
    q, r = chunk_split(numel // row, chunks)
    head = r * (q + 1) * row
    parts = []
    if r:
        parts.append(torch.einsum("kmc,mc->km", task_vectors[:, :head].view(experts, r, (q + 1) * row),
                                  gradient[:head].view(r, (q + 1) * row)))
    if chunks > r:
        parts.append(torch.einsum("kmc,mc->km", task_vectors[:, head:].view(experts, chunks - r, q * row),
                                  gradient[head:].view(chunks - r, q * row)))
    return torch.cat(parts, dim=1)


class LearnedCoefficients(WeightedSum):
    """Applies coefficients alpha[tensor] of shape (K, chunks) in the streaming merge."""

    name = "learned_coefficients"

    def __init__(self, alpha: dict[str, torch.Tensor]):
        super().__init__(self.Params())
        self.alpha = alpha

    def sparsify(self, delta: torch.Tensor, tensor_name: str, expert_index: int) -> torch.Tensor:
        alpha = self.alpha[tensor_name][expert_index]
        row = row_length(delta.shape)
        rows = delta.view(-1, row)
        q, r = chunk_split(rows.shape[0], alpha.numel())
        head = r * (q + 1)
        rows[:head].view(r, q + 1, row).mul_(alpha[:r, None, None])
        rows[head:].view(alpha.numel() - r, q, row).mul_(alpha[r:, None, None])
        return delta

    def add(self, state: State, delta: torch.Tensor, weight: float) -> None:
        state["sum"].add_(delta)  # task weights shaped alpha during calibration: they do not scale it again

    def delta(self, state: State, total_weight: float, base: torch.Tensor) -> torch.Tensor:
        return state["sum"]

