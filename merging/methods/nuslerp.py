"""nuslerp: spherical interpolation between exactly two experts, as mergekit's nuslerp.

The factor is t = w2 / (w1 + w2) from the two weights (t = ½ when |w1 + w2| < 1e-6; a negative weight puts t
outside [0, 1], an extrapolation). With a base θ0 the task vectors are interpolated and the base added back,
θ0 + slerp(t, θ1 − θ0, θ2 − θ0); without one (with_base false) the tensors themselves, slerp(t, θ1, θ2).

slerp works on vectors: the whole tensor (nuslerp_flatten, the default), else each row along the last dim, or with
nuslerp_row_wise each slice along dim 0 (the columns of a matrix). For vectors a, b:
    â = a / max(‖a‖, 1e-7),  cos Ω = clamp(â·b̂, −1, 1),
    slerp(t, a, b) = (sin((1 − t)Ω)·a + sin(tΩ)·b) / sin Ω
on the raw (not unit) a, b. Where 1 − cos²Ω ≤ 1e-16 (colinear in float32) it is the lerp (1 − t)·a + t·b.
A zero vector has â = 0, hence Ω = π/2: sin((1 − t)π/2)·a + sin(tπ/2)·b, not a lerp.
"""

import torch
from pydantic import Field

from merging.methods.base import MethodParams
from merging.methods.group import GroupMethod

NORM_FLOOR = 1e-7
COLINEAR_EPS = 1e-8
ZERO_TOTAL = 1e-6


class NuslerpParams(MethodParams):
    nuslerp_flatten: bool = Field(True, description="interpolate each tensor as one flattened vector")
    nuslerp_row_wise: bool = Field(False, description="unflattened: interpolate the slices along dim 0, not the "
                                                      "rows along the last dim")
    with_base: bool = Field(True, description="interpolate the task vectors from the base (mergekit with "
                                              "base_model); false: the two experts' own tensors")


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Interpolates each vector along the last dim of A and B."""
    cosine = torch.sum(unit(a) * unit(b), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cosine.square()) <= COLINEAR_EPS**2
    # the colinear vectors take the lerp below; Ω = π/2 there only keeps the discarded branch finite
    angle = torch.acos(torch.where(colinear, 0, cosine))
    spherical = (torch.sin((1 - t) * angle) * a + torch.sin(t * angle) * b) / torch.sin(angle)
    return torch.where(colinear, (1 - t) * a + t * b, spherical)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)


def interpolate(t: float, a: torch.Tensor, b: torch.Tensor, flatten: bool, row_wise: bool) -> torch.Tensor:
    """slerp over the vectors the options choose, in the tensors' shape."""
    if flatten:
        return slerp(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    if row_wise:
        return slerp(t, a.transpose(0, -1), b.transpose(0, -1)).transpose(0, -1).reshape(a.shape)
    return slerp(t, a, b).reshape(a.shape)


class Nuslerp(GroupMethod):
    name = "nuslerp"
    Params = NuslerpParams
    allows_negative_weights = True
    min_experts = 2
    max_experts = 2

    def merge(self, base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
              tensor_name: str) -> torch.Tensor:
        total = sum(weights)
        t = 0.5 if abs(total) < ZERO_TOTAL else weights[1] / total
        flatten, row_wise = self.params.nuslerp_flatten, self.params.nuslerp_row_wise
        if not self.params.with_base:
            return interpolate(t, experts[0], experts[1], flatten, row_wise)
        return base + interpolate(t, experts[0] - base, experts[1] - base, flatten, row_wise)
