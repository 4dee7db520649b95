"""model_stock: Model Stock (Jang et al., 2024): θ0 + t·mean(τi) with t = K·c / (1 + (K − 1)·c), where c is
the mean cosine between the task vectors of the K experts, per tensor (or per row with `filter_wise`).

As a fold: the sum of the task vectors, the sum of their unit vectors U and the running sum of pairwise
cosines C (adding τ adds <τ/|τ|, U> to C before τ/|τ| joins U), so c = C / (K(K − 1)/2) and an incremental
merge equals the batch one.
"""

import torch
from pydantic import Field

from merging.methods.base import MergeMethod, MethodParams, State

SINGULAR = 1e-6


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(False, description="one cosine per row of a matrix instead of one per tensor")


class ModelStock(MergeMethod):
    name = "model_stock"
    Params = ModelStockParams
    state_names = ("sum", "unit_sum", "cosine_sum")
    takes_weights = False
    min_experts = 2

    def _reduced_dims(self, tensor: torch.Tensor) -> tuple[int, ...] | None:
        """The dimensions a cosine is taken over: the last one (per row) or all (None)."""
        return (-1,) if self.params.filter_wise and tensor.dim() >= 2 else None

    def state_shape(self, key: str, shape: torch.Size) -> tuple[int, ...]:
        if key != "cosine_sum":
            return tuple(shape)
        return tuple(shape[:-1]) if self.params.filter_wise and len(shape) >= 2 else ()

    def add(self, state: State, delta: torch.Tensor, weight: float) -> None:
        dims = self._reduced_dims(delta)
        state["sum"].add_(delta)
        norm = torch.linalg.vector_norm(delta, dim=dims, keepdim=True)
        unit = delta.div_(norm).nan_to_num_(0.0)  # a zero task vector has no direction: cosine 0, as mergekit
        state["cosine_sum"].add_((unit * state["unit_sum"]).sum(dim=dims))
        state["unit_sum"].add_(unit)

    def delta(self, state: State, total_weight: float, base: torch.Tensor) -> torch.Tensor:
        experts = round(total_weight)  # every weight is 1
        cosine = state["cosine_sum"].div_(experts * (experts - 1) / 2)
        denominator = cosine * (experts - 1) + 1
        # 1 + (K - 1)·c is 0 only where the unit vectors cancel: no shared direction, so t = 0 (as mergekit, below 1e-6)
        singular = denominator.abs() < SINGULAR
        ratio = torch.where(singular, 0.0, cosine * experts / torch.where(singular, 1.0, denominator))
        ratio = ratio.reshape(ratio.shape + (1,) * (base.dim() - ratio.dim()))
        return state["sum"].mul_(ratio / experts)
