"""ties: magnitude trim, sign election, disjoint mean (Yadav et al., 2023), as an exact fold.

The accumulators per entry are P = Σ wi τi over τi > 0, cP = Σ wi over τi > 0, and N, cN likewise for
τi < 0. The elected sign is sign(P + N) = sign(Σ wi trim(τi)); the disjoint mean is P / cP where it is +,
N / cN where it is −, and 0 where the sum is 0.
"""

import torch

from merging.methods.base import DensityParams, MergeMethod, State
from merging.methods.sparsify import magnitude_trim


class Ties(MergeMethod):
    name = "ties"
    Params = DensityParams
    state_names = ("positive_sum", "positive_weight", "negative_sum", "negative_weight")

    def sparsify(self, delta: torch.Tensor, tensor_name: str, expert_index: int) -> torch.Tensor:
        return magnitude_trim(delta, self.params.density)

    def add(self, state: State, delta: torch.Tensor, weight: float) -> None:
        weighted = delta * weight
        state["positive_sum"].add_(weighted.clamp(min=0))
        state["negative_sum"].add_(weighted.clamp(max=0))
        state["positive_weight"].add_(delta > 0, alpha=weight)
        state["negative_weight"].add_(delta < 0, alpha=weight)

    def delta(self, state: State, total_weight: float) -> torch.Tensor:
        positive, negative = state["positive_sum"], state["negative_sum"]
        elected = positive + negative
        merged = torch.where(elected > 0, positive / state["positive_weight"],
                             torch.where(elected < 0, negative / state["negative_weight"], 0.0))
        return merged * self.params.scale
