"""ram and ramplus_tl: Reinforced Agent Merging (arXiv 2601.13572), within each tensor.

With τi = θi − θ0 for the n experts, expert i changes an entry when |τi| > ε there; c is the number of experts
that change it. Each entry of the merge is
    ram:        θ = θ0 + τi            where c = 1 (the one expert's change, whole)
                θ = θ0 + Σi τi / c     where c > 1, over the experts that change it (a disjoint mean)
                θ = θ0                 where c = 0
so a change of at most ε is left out of both the sum and the count.
ramplus_tl scales each expert's unique changes (c = 1) by λi = 1 + r · clamp(ρi, 0, α), ρi = Si / max(Ui, ε),
with Ui and Si the numbers of this tensor's entries that expert i changes alone and together with others.

The config's per-expert weights do not enter. One expert: every change is unique and ρ = 0, so both give
θ0 + τ1 with the changes of at most ε dropped; identical experts: every change is shared by all, θ0 + τ likewise.
With ε = 0, an expert that changes nothing in a tensor has ρi = 0/0, and ramplus_tl's whole tensor is NaN, as in
mergekit.
"""

import torch
from pydantic import Field

from merging.methods.base import MethodParams
from merging.methods.group import GroupMethod


class RamParams(MethodParams):
    epsilon: float = Field(1e-5, description="an expert changes an entry when |τi| exceeds it")


class RamPlusParams(RamParams):
    r: float = Field(0.1, description="gain r of the unique changes' scale λi = 1 + r · clamp(ρi, 0, α)")
    alpha: float = Field(0.2, description="cap α of the shared-to-unique ratio ρi in λi")


def disjoint_merge(task_vectors: torch.Tensor, changes: torch.Tensor, unique_scale: torch.Tensor) -> torch.Tensor:
    """Σi over the experts changing each entry: λi τi where one expert changes it, τi / c where several do.
    task_vectors and changes are (n, entries), unique_scale (n, 1)."""
    counts = changes.sum(dim=0, keepdim=True)
    kept = task_vectors * changes
    # dividing each τi by c before the sum, not the sum after, is mergekit's order of float operations
    return (kept * (counts == 1) * unique_scale + kept * (counts > 1) / counts.clamp(min=1)).sum(dim=0)


class Ram(GroupMethod):
    name = "ram"
    Params = RamParams
    takes_weights = False

    def unique_scale(self, changes: torch.Tensor) -> torch.Tensor:
        """λi per expert, (n, 1): 1 for plain ram (an exact float no-op)."""
        return torch.ones(len(changes), 1)

    def merge(self, base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
              tensor_name: str) -> torch.Tensor:
        task_vectors = torch.stack([expert - base for expert in experts]).view(len(experts), -1)
        changes = task_vectors.abs() > self.params.epsilon
        return base + disjoint_merge(task_vectors, changes, self.unique_scale(changes)).view_as(base)


class RamPlusTl(Ram):
    name = "ramplus_tl"
    Params = RamPlusParams

    def unique_scale(self, changes: torch.Tensor) -> torch.Tensor:
        counts = changes.sum(dim=0, keepdim=True)
        shared = (changes & (counts > 1)).sum(dim=1)
        unique = (changes & (counts == 1)).sum(dim=1)
        # the int64 counts clamped by a float give float32, so ρ is computed in float32 as in mergekit
        ratio = shared / unique.clamp(min=self.params.epsilon)
        return (1 + self.params.r * ratio.clamp(min=0, max=self.params.alpha)).unsqueeze(-1)
