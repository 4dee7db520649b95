"""dare_linear: DARE drop-and-rescale of each task vector, then task arithmetic."""

import torch

from merging.methods.base import DropParams, LinearParams
from merging.methods.sparsify import dare_drop_
from merging.methods.task_arithmetic import TaskArithmetic


class DareLinearParams(DropParams, LinearParams):
    pass


class DareLinear(TaskArithmetic):
    name = "dare_linear"
    Params = DareLinearParams
    allows_negative_weights = False

    def sparsify(self, delta: torch.Tensor, tensor_name: str, expert_index: int) -> torch.Tensor:
        return dare_drop_(delta, self.params.density, self.seed, tensor_name, expert_index, self.params.rescale)
