"""nearswap: take the expert where it is near the base, as mergekit's nearswap.

Per entry, with the base θ0 and the one expert θ1:
    w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1),   merged = w·θ1 + (1 − w)·θ0
so entries within t of the base become the expert's, and farther ones move t towards it (w·|θ1 − θ0| = t).
t ≤ 0 returns the base; identical entries return that value.
"""

import torch
from pydantic import Field

from merging.methods.base import MethodParams
from merging.methods.group import GroupMethod

MIN_DISTANCE = 1e-6


class NearswapParams(MethodParams):
    t: float = Field(description="distance from the base within which an entry is swapped for the expert's")


class Nearswap(GroupMethod):
    name = "nearswap"
    Params = NearswapParams
    takes_weights = False
    max_experts = 1

    def merge(self, base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
              tensor_name: str) -> torch.Tensor:
        expert = experts[0]
        # a Python float over a tensor, as in mergekit: torch rounds it as t · (1 / d), not t / d
        weight = (self.params.t / (base - expert).abs().clamp(min=MIN_DISTANCE)).clamp(min=0, max=1)
        return weight * expert + (1 - weight) * base
