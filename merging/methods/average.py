"""average: θ0 + Σ wi τi / Σ wi, the weighted mean of the experts."""

import torch

from merging.methods.base import State, WeightedSum


class Average(WeightedSum):
    name = "average"

    def delta(self, state: State, total_weight: float, base: torch.Tensor) -> torch.Tensor:
        return state["sum"].div_(total_weight)
