"""multislerp: a weighted barycentre of any number of experts on the hypersphere, as mergekit's multislerp.

Each input xi is the whole flattened tensor: the task vector θi − θ0 with a base, the expert's own tensor without
one (with_base false). With weights wi (divided by Σ wi when normalize_weights):
    ui = xi / (‖xi‖ + ε),   m = Σ wi·ui / ‖Σ wi·ui‖            (the tangent point: the Euclidean mean's direction)
    v = Σ wi·(ui − (ui·m)·m),   L = ‖v‖ + ε                     (the weighted tangent vectors at m)
    merged = (m·cos L + v·sin L / L) · Σ wi‖xi‖                 (back onto the sphere, at the mean norm)
and the base is added back. As m is the direction of Σ wi·ui, v vanishes but for rounding: merged is
m·cos ε·Σ wi‖xi‖ in exact arithmetic, computed as mergekit does all the same, for the same rounding.
One expert is returned as it is (even with a base). Where ‖Σ wi·ui‖ < ε (antipodal inputs whose weights cancel)
two experts fall back to the lerp w1·x1 + w2·x2 (+ θ0); more are an error. Weights summing to 0 give NaN when
normalize_weights, as in mergekit.
"""

import torch
from pydantic import Field

from merging.errors import ConfigError
from merging.methods.base import MethodParams
from merging.methods.group import GroupMethod


class MultislerpParams(MethodParams):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, description="added to the norms to keep the divisions finite")
    with_base: bool = Field(True, description="interpolate the task vectors from the base (mergekit with "
                                              "base_model); false: the experts' own tensors")


class Multislerp(GroupMethod):
    name = "multislerp"
    Params = MultislerpParams
    allows_negative_weights = True

    def merge(self, base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
              tensor_name: str) -> torch.Tensor:
        if len(experts) == 1:
            return experts[0].clone()
        eps = self.params.eps
        vectors = torch.stack(experts)
        if self.params.with_base:
            vectors -= base
        vectors = vectors.view(len(experts), -1)
        factors = torch.tensor(weights, dtype=vectors.dtype, device=vectors.device)
        if self.params.normalize_weights:
            factors = factors / factors.sum()
        factors = factors.view(-1, 1)
        norms = torch.norm(vectors, dim=-1, keepdim=True)
        units = vectors / (norms + eps)
        mean = (units * factors).sum(0)
        mean_norm = torch.norm(mean)
        if mean_norm < eps:
            if len(experts) != 2:
                raise ConfigError(f"multislerp: {tensor_name}: the experts' weighted directions cancel out "
                                  "(antipodal experts with balancing weights); change the weights")
            merged = vectors[0] * factors[0] + vectors[1] * factors[1]
        else:
            mean = mean / mean_norm
            tangents = units - (units * mean).sum(-1, keepdim=True) * mean
            tangent = (tangents * factors).sum(0)
            length = torch.norm(tangent) + eps
            # the exponential map at m; this order of the products is mergekit's, so the rounding is too
            merged = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * (norms * factors).sum()
        merged = merged.view(experts[0].shape)
        return merged + base if self.params.with_base else merged
