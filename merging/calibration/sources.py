"""Where each calibrated tensor's expert updates come from, without ever holding more than calibration needs.

Per tensor, each expert contributes one of:
- low-rank factors (a LoRA adapter on a linear layer): kept factored, A and B of every such adapter concatenated,
  so the merged layer computes W0·x + Σk αk·sk·Bk·(Ak·x) and no (out, in) update is ever formed;
- a dense task vector held on the device (a full checkpoint in the resident layout, or what an adapter saves
  whole: modules_to_save, embeddings, a lora_B bias), (K_dense, numel) of those experts only;
- a streamed task vector (a full checkpoint in the streamed layout): read per tensor when the layer runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from merging.experts import Expert, FullCheckpoint, LoraAdapter
from merging.io.checkpoint import CheckpointReader
from merging.io.safetensors_file import read_tensor
from merging.methods.learned import row_coefficients


@dataclass
class LowRank:
    """The adapters' factors of one linear weight (out, in), concatenated along the rank: R = Σ r_k."""

    experts: torch.Tensor  # (R,) long: the expert of each rank row
    a: torch.Tensor  # (R, in)
    b: torch.Tensor  # (out, R)
    scale: torch.Tensor  # (R,) s_k of each rank row

    def scale_alpha(self, alpha: torch.Tensor) -> torch.Tensor:
        """α (K, m) -> the rank-space scale: (1, R) when m = 1, else (out, R) (row blocks scale rows of B);
        α (R,), one per component (calibration/components.py) -> (1, R)."""
        if alpha.dim() == 1:
            return (alpha * self.scale).unsqueeze(0)
        if alpha.shape[1] == 1:
            return (alpha[self.experts, 0] * self.scale).unsqueeze(0)
        return (row_coefficients(alpha, self.b.shape[0])[self.experts] * self.scale[:, None]).T

    def megabytes(self) -> float:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b, self.scale)) / 2**20


@dataclass
class DenseVectors:
    experts: list[int]
    vectors: torch.Tensor  # (len(experts), numel) in the compute dtype, on the device


@dataclass
class StreamedVectors:
    """Full checkpoints' task vectors of one tensor, read from their files each time the layer runs."""

    name: str
    experts: list[int]
    checkpoints: list[CheckpointReader]

    def read(self, base_weight: torch.Tensor) -> torch.Tensor:
        """(len(experts), numel) float32 on base_weight's device: each expert's tensor minus the base's."""
        base = base_weight.detach().reshape(-1).float()
        return torch.stack([read_tensor(c.tensors[self.name]).to(base.device).reshape(-1).float() - base
                            for c in self.checkpoints])

    def megabytes(self, numel: int) -> float:
        return 4 * (len(self.experts) + 1) * numel / 2**20  # the float32 stack and the base copy while it runs


@dataclass
class TensorSources:
    name: str
    shape: tuple[int, ...]
    l1: torch.Tensor  # (K,) float32: ‖τk‖₁, EM++'s importance
    low_rank: LowRank | None = None
    dense: DenseVectors | None = None
    streamed: StreamedVectors | None = None

    @property
    def via_module(self) -> bool:
        """True when the layer itself applies α (factors or streamed vectors), not a merged weight."""
        return self.low_rank is not None or self.streamed is not None


@dataclass
class Layout:
    """What `load_sources` did: per tensor sources, and the memory each kind holds."""

    sources: dict[str, TensorSources]
    megabytes: dict[str, float] = field(default_factory=dict)


def factorable(model: torch.nn.Module, name: str) -> bool:
    """A linear layer's weight: the only place the merged layer can apply factors or streamed vectors."""
    module_name, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return leaf == "weight" and type(module) is torch.nn.Linear


def _low_rank_factors(expert: Expert, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A, B, scale) when this adapter changes tensor `name` by factors alone (nothing saved whole)."""
    if not isinstance(expert, LoraAdapter):
        return None
    change = expert.changes.get(name)
    if change is None or change.factors is None or change.replacement is not None or change.factors.transposed:
        return None
    factors = change.factors
    return read_tensor(factors.a).float(), read_tensor(factors.b).float(), factors.scale


def load_sources(base: CheckpointReader, experts: list[Expert], names: list[str], model: torch.nn.Module,
                 *, factored: bool, streamed: bool, device: torch.device, dtype: torch.dtype) -> Layout:
    """Every calibrated tensor's sources. factored: adapters on linear layers stay factors; streamed: full
    checkpoints on linear layers are read as the layer runs. Everything else is a dense resident task vector."""
    sources: dict[str, TensorSources] = {}
    for name in names:
        base_values: list[torch.Tensor] = []  # read once, and only when an expert's update is not factors

        def base_tensor(name: str = name, cache: list[torch.Tensor] = base_values) -> torch.Tensor:
            if not cache:
                cache.append(base.read(name).float())
            return cache[0]

        l1 = torch.zeros(len(experts))
        linear = factorable(model, name)
        low: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
        dense_experts, dense_vectors, streamed_experts = [], [], []
        for k, expert in enumerate(experts):
            factors = _low_rank_factors(expert, name) if factored and linear else None
            if factors is not None:
                a, b, scale = factors
                l1[k] = (b @ a).abs_().sum() * abs(scale)  # one (out, in) at a time, for EM++'s importance only
                low.append((k, a, b, scale))
            elif streamed and linear and isinstance(expert, FullCheckpoint):
                vector = expert.read_task_vector(name, base_tensor())
                l1[k] = vector.abs().sum()
                streamed_experts.append(k)
            else:
                vector = expert.read_task_vector(name, base_tensor())
                if vector is not None:
                    l1[k] = vector.abs().sum()
                    dense_experts.append(k)
                    dense_vectors.append(vector.reshape(-1).to(device, dtype))
        entry = TensorSources(name, tuple(base.tensors[name].shape), l1)
        if low:
            entry.low_rank = LowRank(
                torch.tensor([k for k, a, _, _ in low for _ in range(a.shape[0])], device=device),
                torch.cat([a for _, a, _, _ in low]).to(device, dtype),
                torch.cat([b for _, _, b, _ in low], dim=1).to(device, dtype),
                torch.tensor([s for _, a, _, s in low for _ in range(a.shape[0])], device=device, dtype=dtype))
        if dense_experts:
            entry.dense = DenseVectors(dense_experts, torch.stack(dense_vectors))
        if streamed_experts:
            entry.streamed = StreamedVectors(name, streamed_experts, [experts[k].reader for k in streamed_experts])
        sources[name] = entry
    return Layout(sources, _megabytes(sources))


def _megabytes(sources: dict[str, TensorSources]) -> dict[str, float]:
    def size(tensor: torch.Tensor) -> float:
        return tensor.numel() * tensor.element_size() / 2**20

    numel = {name: torch.Size(s.shape).numel() for name, s in sources.items()}
    return {
        "factors_mb": sum(s.low_rank.megabytes() for s in sources.values() if s.low_rank),
        "task_vectors_mb": sum(size(s.dense.vectors) for s in sources.values() if s.dense),
        "streamed_tensor_mb": max((s.streamed.megabytes(numel[n]) for n, s in sources.items() if s.streamed),
                                  default=0.0),
    }
