"""ties: magnitude trim, sign election, disjoint mean (Yadav et al., 2023), as an exact fold.

The accumulators per entry are P = Σ wi τi over τi > 0, cP = Σ wi over τi > 0, and N, cN likewise for
τi < 0. The elected sign is sign(P + N) = sign(Σ wi trim(τi)); the disjoint mean is P / cP where it is +,
N / cN where it is −, and 0 where the sum is 0.
"""

import torch

from merging.methods.base import DensityParams, MergeMethod, State
from merging.methods.sparsify import magnitude_trim_


class Ties(MergeMethod):
    name = "ties"
    Params = DensityParams
    state_names = ("positive_sum", "positive_weight", "negative_sum", "negative_weight")

    def sparsify(self, delta: torch.Tensor, tensor_name: str, expert_index: int) -> torch.Tensor:
        return magnitude_trim_(delta, self.params.density)

    def add(self, state: State, delta: torch.Tensor, weight: float) -> None:
        positive = delta.clamp(min=0)
        negative = delta.sub_(positive)  # exactly min(delta, 0), in the caller's scratch buffer
        state["positive_sum"].add_(positive, alpha=weight)
        state["negative_sum"].add_(negative, alpha=weight)
        state["positive_weight"].add_(positive > 0, alpha=weight)
        state["negative_weight"].add_(negative < 0, alpha=weight)

    def delta(self, state: State, total_weight: float, base: torch.Tensor) -> torch.Tensor:
        positive, negative = state["positive_sum"], state["negative_sum"]
        elected = positive + negative
        # 0/0 where no expert has that sign; those entries are never selected below
        positive_mean = positive.div_(state["positive_weight"])
        negative_mean = negative.div_(state["negative_weight"])
        merged = torch.where(elected > 0, positive_mean, negative_mean).masked_fill_(elected == 0, 0.0)
        return merged.mul_(self.params.scale)
