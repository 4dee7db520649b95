"""ties: magnitude trim, sign election, disjoint mean (Yadav et al., 2023), as an exact fold.

The accumulators per entry are P = Σ wi τi over τi > 0, cP = Σ wi over τi > 0, and N, cN likewise for
τi < 0. The elected sign is + where P + N = Σ wi trim(τi) ≥ 0 (mergekit's tie rule), − elsewhere; the disjoint
mean is P / cP where it is +, N / cN where it is − (0 where no expert has the elected sign); with
`normalize: false`, P or N itself.
"""

import torch

from merging.methods.base import DensityParams, DisjointParams, MergeMethod, State
from merging.methods.sparsify import magnitude_trim_


class TiesParams(DensityParams, DisjointParams):
    pass


class Ties(MergeMethod):
    name = "ties"
    Params = TiesParams
    state_names = ("positive_sum", "positive_weight", "negative_sum", "negative_weight")

    def sparsify(self, delta: torch.Tensor, tensor_name: str, expert_index: int) -> torch.Tensor:
        return magnitude_trim_(delta, self.params.density, self.params.rescale)

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
        if self.params.normalize:
            for total, weight in ((positive, state["positive_weight"]), (negative, state["negative_weight"])):
                total.div_(weight.masked_fill_(weight == 0, 1.0))  # no expert of that sign: its sum is 0 too
        return torch.where(elected >= 0, positive, negative).mul_(self.params.scale)
