"""Per-component coefficients (`params.coefficients: rank`): one α per rank-1 component of each LoRA adapter.

A LoRA expert's update of a linear weight is s_k·B_k·A_k, the sum of r_k rank-1 components s_k·b_ki·a_kiᵀ. The
tensor family scales them all by one α_k; the rank family gives each its own: ΔW = Σk B_k·diag(α_k·s_k)·A_k.
Calibration already applies the coefficients in the rank space (factored.LowRankDelta scales u = A·x per rank
row), so the richer family costs R = Σ r_k coefficients per tensor instead of K, and no other work per step.

Such a tensor's α is 1-D, (R,): expert 0's r_0 components, then expert 1's, ... in the order of each adapter's A
rows (an expert that leaves the tensor alone has none); a 2-D (K, m) α is per tensor (m = 1) or per row block.
Only a tensor whose every expert update is LoRA factors gets components: a full checkpoint's task vector or what
an adapter saves whole (modules_to_save, a lora_B bias) has no rank-1 parts to weigh.
"""

from __future__ import annotations

import logging

import torch

from merging.calibration.sources import TensorSources
from merging.errors import ConfigError
from merging.experts import Expert, LoraAdapter, require_finite
from merging.io.checkpoint import CheckpointReader
from merging.streaming import WeightedExpert

log = logging.getLogger("mergeplan")


def is_components(alpha: torch.Tensor) -> bool:
    return alpha.dim() == 1


def component_experts(sources: dict[str, TensorSources], experts: int) -> dict[str, torch.Tensor]:
    """Tensor -> (R,) the expert of each component, for the tensors whose every expert update is factors."""
    chosen = {name: s.low_rank.experts for name, s in sources.items()
              if s.low_rank is not None and s.dense is None and s.streamed is None}
    components = sum(int(e.numel()) for e in chosen.values())
    (log.info if chosen else log.warning)(
        "coefficients: rank: %d tensors are LoRA factors only and take one α per component (%d coefficients, "
        "against %d per tensor and expert; EM++: those its allocation picks), %d keep one α per tensor "
        "(full-checkpoint experts or an adapter's dense parts: modules_to_save, biases)",
        len(chosen), components, experts * len(chosen), len(sources) - len(chosen))
    return chosen


def per_component(alpha: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """(K, 1) per-tensor values -> (R,): each component at its tensor's value for its expert."""
    return alpha[experts.to(alpha.device), 0].contiguous()


def pull_weights(experts: torch.Tensor) -> torch.Tensor:
    """(R,) 1/r_k: the L1 pull counts an expert's r_k components on a tensor as one coefficient (their mean
    |α − ᾱ|), so with every component at its tensor's α the pull equals the tensor family's and γ keeps its scale."""
    counts = torch.bincount(experts)
    return 1.0 / counts[experts].float()


def ranks_of(experts: torch.Tensor, count: int) -> list[int]:
    """Components per expert (0 where the expert leaves the tensor alone)."""
    return torch.bincount(experts.cpu(), minlength=count).tolist()


def split(alpha: torch.Tensor, ranks: list[int]) -> list[torch.Tensor]:
    """(R,) -> each expert's (r_k,) coefficients."""
    return list(torch.split(alpha, ranks))


def component_update(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, scale: float) -> torch.Tensor:
    """B·diag(α·s)·A in float32: B's columns scaled, one product (what lora_out writes as this expert's B)."""
    return torch.mm(scaled_b(b, alpha, scale), a.float())


def scaled_b(b: torch.Tensor, alpha: torch.Tensor, scale: float) -> torch.Tensor:
    return b.float() * (alpha.float() * scale)[None, :]


class ComponentScaled(Expert):
    """An adapter whose update of the tensors in `alpha` is B·diag(α·s)·A (its own per-component coefficients
    already applied); every other tensor reads as the adapter's. The streaming merge then weighs those tensors
    by 1."""

    def __init__(self, adapter: LoraAdapter, alpha: dict[str, torch.Tensor]):
        self.adapter, self.alpha = adapter, alpha
        self.folder, self.kind = adapter.folder, adapter.kind

    def check_compatible(self, base: CheckpointReader) -> None:
        self.adapter.check_compatible(base)

    def load(self, name: str) -> object:
        return self.adapter.load(name)

    def task_vector(self, name: str, loaded, base_tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        alpha = self.alpha.get(name)
        if alpha is None:
            return self.adapter.task_vector(name, loaded, base_tensor, out)
        _, a, b = loaded
        factors = self.adapter.changes[name].factors
        require_finite(a, self.folder, factors.a.name)
        require_finite(b, self.folder, factors.b.name)
        return torch.mm(scaled_b(b, alpha, factors.scale), a.float(), out=out)


def component_factors(expert: Expert, tensor: str):
    """The LoraFactors that per-component coefficients of `tensor` scale, or None when the expert leaves it alone;
    raises ValueError naming why when the expert changes it some other way."""
    if not isinstance(expert, LoraAdapter):
        raise ValueError(f"expert {expert.folder} is a {expert.kind}, not a LoRA adapter")
    change = expert.changes.get(tensor)
    if change is None:
        return None
    if change.factors is None or change.replacement is not None or change.factors.transposed:
        raise ValueError(f"expert {expert.folder} changes it other than by (non-transposed) LoRA factors")
    return change.factors


def scaled_experts(experts: list[WeightedExpert], names: list[str], alpha: dict[str, torch.Tensor],
                   ranks: dict[str, list[int]], source: str) -> list[WeightedExpert]:
    """The experts of `mergeplan apply` for per-component coefficients: each adapter with a component tensor
    wrapped as ComponentScaled. Refuses, one line naming the tensor, coefficients these experts cannot take."""
    own: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    for tensor, counts in ranks.items():
        for k, (expert, part, count) in enumerate(zip(experts, split(alpha[tensor], counts), counts, strict=True)):
            try:
                factors = component_factors(expert.expert, tensor)
            except ValueError as exc:
                raise ConfigError(f"{source}: tensors.{tensor}: per-component coefficients apply to LoRA factors "
                                  f"only, and {exc}") from None
            rank = 0 if factors is None else factors.rank
            if rank != count:
                raise ConfigError(f"{source}: tensors.{tensor}.alpha.{names[k]}: {count} component coefficients, but "
                                  f"the adapter {expert.expert.folder} has rank {rank} there; calibrate again")
            if count:
                own[k][tensor] = part
    return [WeightedExpert(ComponentScaled(e.expert, a), e.weight, e.index) if a else e
            for e, a in zip(experts, own, strict=True)]


def check_warm(alpha: dict[str, torch.Tensor], components: dict[str, torch.Tensor], source: str) -> None:
    """Refuse, one line, row blocks where this run trains components (a component starts from its tensor's one
    α). Components where this run has none: Coefficients.warm_start refuses them."""
    for name, earlier in alpha.items():
        if not is_components(earlier) and name in components and earlier.shape[1] > 1:
            raise ConfigError(f"{source}: params.warm_start: {name} has {earlier.shape[1]} row-block coefficients "
                              "(EM++ with coefficients: tensor); a coefficients: rank run starts each component "
                              "from its tensor's α: warm-start from an expert_merging file, or start cold")
