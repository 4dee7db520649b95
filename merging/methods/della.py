"""della: DELLA-Merging (Deep et al., 2024): MagPrune drops each task vector's entries with a probability that
falls with their magnitude rank in the row and rescales the kept ones by 1/p, then the TIES sign election and
disjoint mean; della_linear follows the drop with task arithmetic instead."""

import torch
from pydantic import Field, ValidationInfo, field_validator

from merging.methods.base import DisjointParams, DropParams, LinearParams
from merging.methods.sparsify import della_drop_
from merging.methods.task_arithmetic import TaskArithmetic
from merging.methods.ties import Ties


class DellaParams(DropParams):
    epsilon: float = Field(0.15, ge=0, description="half-width of the keep probabilities around density")

    @field_validator("epsilon")
    @classmethod
    def _probabilities_in_range(cls, epsilon: float, info: ValidationInfo) -> float:
        density = info.data.get("density")
        if density is not None and density < 1 and not 0 < density - epsilon < density + epsilon <= 1:
            raise ValueError(f"density ± epsilon must lie in (0, 1]: {density:g} ± {epsilon:g}; take a smaller "
                             "epsilon")
        return epsilon


class DellaLinearParams(DellaParams, LinearParams):
    pass


class DellaTiesParams(DellaParams, DisjointParams):
    pass


class Della(Ties):
    name = "della"
    Params = DellaTiesParams

    def sparsify(self, delta: torch.Tensor, tensor_name: str, expert_index: int) -> torch.Tensor:
        return della_drop_(delta, self.params.density, self.params.epsilon, self.seed, tensor_name, expert_index,
                           self.params.rescale)


class DellaLinear(TaskArithmetic):
    name = "della_linear"
    Params = DellaLinearParams
    allows_negative_weights = False

    def sparsify(self, delta: torch.Tensor, tensor_name: str, expert_index: int) -> torch.Tensor:
        return della_drop_(delta, self.params.density, self.params.epsilon, self.seed, tensor_name, expert_index,
                           self.params.rescale)
