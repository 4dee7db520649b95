"""task_arithmetic: θ0 + λ Σ wi τi, divided by Σ wi when `normalize` is set."""

import torch

from merging.methods.base import LinearParams, State, WeightedSum


class TaskArithmetic(WeightedSum):
    name = "task_arithmetic"
    Params = LinearParams
    allows_negative_weights = True

    def delta(self, state: State, total_weight: float, base: torch.Tensor) -> torch.Tensor:
        scale = self.params.scale / total_weight if self.params.normalize else self.params.scale
        return state["sum"].mul_(scale)
