"""karcher: the equal-weight Karcher (Riemannian) mean of the inputs' directions on the hypersphere, as mergekit's
karcher.

The inputs xi (i = 1..n) are whole tensors, not task vectors: the experts, then the base when with_base (mergekit
has no base policy here and merges every model, base_model included; it appends the base last when the base is not
among its models). Each has the weight 1/n. With ui = xi / ‖xi‖ over the valid inputs (‖xi‖ > tol), and their
weights αi renormalised to sum to 1:
    m = Σ αi·ui / ‖Σ αi·ui‖          (u of the first valid input if ‖Σ αi·ui‖ < tol)
then up to max_iter gradient steps on the sphere (exp_m(v) = m·cos‖v‖ + v·sin‖v‖ / ‖v‖):
    θi = arccos(clamp(m·ui, −1, 1)),  v = Σ αi·θi / sin θi·(ui − (m·ui)·m) over θi ≥ tol,
    stop if ‖v‖ < tol, else m ← exp_m(v) / ‖exp_m(v)‖ (the division only if that norm > tol),
and the result is m · Σ ‖xi‖ / n (every input's norm, the invalid ones too). One input is returned as it is; if
no input is valid the result is zero.
"""

import torch
from pydantic import Field

from merging.methods.base import MethodParams
from merging.methods.group import GroupMethod


class KarcherParams(MethodParams):
    max_iter: int = Field(10, ge=0, description="most gradient steps of the mean on the sphere")
    tol: float = Field(1e-5, gt=0, description="norms, angles and steps below this count as zero")
    with_base: bool = Field(True, description="the base is one of the averaged models (mergekit with base_model); "
                                              "false: the experts only")


def initial_mean(units: list[torch.Tensor], alphas: list[float], tol: float) -> torch.Tensor:
    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(alphas, units, strict=True):
        mean += alpha * unit  # not add_(alpha=): mergekit's rounding
    mean_norm = torch.linalg.vector_norm(mean)
    return units[0].clone() if mean_norm.item() < tol else mean / mean_norm


def karcher_mean(units: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher mean of unit tensors (alphas sum to 1), a unit tensor."""
    mean = initial_mean(units, alphas, tol)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(alphas, units, strict=True):
            cosine = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            angle = torch.arccos(cosine)
            if angle.item() < tol:  # θ / sin θ → 1 but the direction ui − (m·ui)·m vanishes
                continue
            tangent += alpha * (angle / torch.sin(angle)) * (unit - cosine * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        # the exponential map at m; this order of the products is mergekit's, so the rounding is too
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        mean_norm = torch.linalg.vector_norm(mean)
        if mean_norm.item() > tol:
            mean = mean / mean_norm
    return mean


class Karcher(GroupMethod):
    name = "karcher"
    Params = KarcherParams
    takes_weights = False

    def merge(self, base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
              tensor_name: str) -> torch.Tensor:
        inputs = [*experts, base] if self.params.with_base else experts
        if len(inputs) == 1:
            return inputs[0].clone()
        tol = self.params.tol
        norms = [torch.linalg.vector_norm(x) for x in inputs]
        units = [x / norm for x, norm in zip(inputs, norms, strict=True) if norm.item() > tol]
        if not units:
            return torch.zeros_like(inputs[0])
        mean = karcher_mean(units, [1 / len(units)] * len(units), self.params.max_iter, tol)
        alpha = 1 / len(inputs)  # each input's weight; the scale is the mean norm of all inputs
        return sum(alpha * norm for norm in norms) * mean
