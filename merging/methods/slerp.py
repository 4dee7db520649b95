"""slerp: spherical interpolation from the base θ0 (t = 0) to the one expert θ1 (t = 1), per tensor, as
mergekit's slerp between its base_model and the other model. Where the two tensors are almost colinear
(|cos| > 0.9995, the usual case for a fine-tune and its base) it is the linear interpolation θ0 + t·τ1."""

import math

import torch
from pydantic import Field

from merging.methods.base import MethodParams, State, WeightedSum

COLINEAR = 0.9995


class SlerpParams(MethodParams):
    t: float = Field(ge=0, le=1, description="interpolation factor: 0 is the base, 1 the expert")


class Slerp(WeightedSum):
    name = "slerp"
    Params = SlerpParams
    takes_weights = False
    max_experts = 1

    def delta(self, state: State, total_weight: float, base: torch.Tensor) -> torch.Tensor:
        vector = state["sum"]
        t = self.params.t
        expert = base + vector
        base_norm, expert_norm = torch.linalg.vector_norm(base), torch.linalg.vector_norm(expert)
        if base_norm == 0 or expert_norm == 0:
            return vector.mul_(t)
        cosine = float((base / base_norm * (expert / expert_norm)).sum())
        if abs(cosine) > COLINEAR:
            return vector.mul_(t)
        angle = math.acos(cosine)
        start, end = math.sin((1 - t) * angle) / math.sin(angle), math.sin(t * angle) / math.sin(angle)
        # start·θ0 + end·θ1 − θ0 = (start + end − 1)·θ0 + end·τ1
        return vector.mul_(end).add_(base, alpha=start + end - 1)
