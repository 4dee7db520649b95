"""sce: select, calculate, erase (Wan et al., 2024, FuseChat), over all experts' task vectors at once.

With τi = θi − θ0 for the n experts, per tensor:
1. select: when s = select_topk < 1, keep in every τi only the k entries of largest variance across experts,
   Var = (1/n) Σi (τi − mean τ)², k = int(s · #{Var ≠ 0}) (no entry when s ≤ 0); s ≥ 1 keeps all.
2. calculate: ωi = mean(τi²) / Σj mean(τj²), the means over all entries of the selected τi; 1/n each when that
   sum is below 1e-6.
3. erase: the elected sign is + where Σi τi ≥ 0 and − elsewhere; mi = 1 where sign(τi) is the elected sign
   (so a zero entry never enters), else 0.
θ = θ0 + Σi ωi mi τi / max(Σi ωi mi, 1e-6): 0 where no expert survives, and shrunk by Σi ωi mi / 1e-6 where the
survivors' weights sum below 1e-6.

The config's per-expert weights do not enter: ωi comes from the task vectors alone. One expert, or identical
experts, have zero variance everywhere, so any s < 1 selects nothing and gives θ0; with s ≥ 1 one expert gives
θ0 + τ1 and identical experts give θ0 + τ.
"""

import torch
from pydantic import Field

from merging.methods.base import MethodParams
from merging.methods.group import GroupMethod

WEIGHT_FLOOR = 1e-6  # below it the energies are taken as equal, and the smallest divisor of the weighted mean


class SceParams(MethodParams):
    select_topk: float = Field(1.0, description="fraction of the entries with nonzero variance across experts "
                                                "kept, those of largest variance; ≥ 1 keeps all, ≤ 0 none")
    int8_mask: bool = Field(False, description="mergekit's storage type for its masks; no effect on the result")


def variance_mask(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """The entries (shaped like one task vector) of largest variance across the stacked task vectors."""
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    # k in float32 arithmetic, as mergekit computes it: int(count · s) in float64 can differ by one on big tensors
    keep = max(int(torch.count_nonzero(variance) * select_topk), 0)
    mask = torch.zeros(variance.numel(), dtype=torch.bool)
    # torch.topk rather than top_magnitude_mask: mergekit keeps topk's choice among equal variances, which on CPU
    # is nth_element's or partial_sort's order, not index order, and equal variances are common with bf16 experts
    mask[torch.topk(variance.reshape(-1), keep).indices] = True
    return mask.view(variance.shape)


def energy_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """ωi = mean(τi²) / Σj mean(τj²), or 1/n each when that sum is below the floor."""
    energies = task_vectors.square().reshape(len(task_vectors), -1).mean(dim=1)
    total = energies.sum().item()
    if total < WEIGHT_FLOOR:
        return torch.ones_like(energies) / len(energies)
    return energies / total


def sign_agreement(task_vectors: torch.Tensor) -> torch.Tensor:
    """mi: whether τi has the sign of Σi τi (+ where that sum is 0)."""
    elected = torch.where(task_vectors.sum(dim=0) >= 0, 1.0, -1.0)
    return task_vectors.sign() == elected


class Sce(GroupMethod):
    name = "sce"
    Params = SceParams
    takes_weights = False

    def merge(self, base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
              tensor_name: str) -> torch.Tensor:
        task_vectors = torch.stack([expert - base for expert in experts])
        if self.params.select_topk < 1:
            task_vectors = task_vectors * variance_mask(task_vectors, self.params.select_topk)
        omega = energy_weights(task_vectors).view(-1, *[1] * base.dim())
        kept_weights = omega * sign_agreement(task_vectors)
        merged = (task_vectors * kept_weights).sum(dim=0) / kept_weights.sum(dim=0).clamp(min=WEIGHT_FLOOR)
        return base + merged
