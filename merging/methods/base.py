"""The one interface every merge method implements, as a fold over experts.

A method keeps per-tensor accumulators (`state`: float32 tensors named `state_names`, starting at zero).
Each expert's task vector is optionally sparsified (in place or not: the caller's buffer is scratch),
then folded in with `add`; `delta` turns the accumulators (and, for SLERP, the base tensor) into the merged
task vector. An accumulator is shaped like the tensor unless `state_shape` says otherwise. A batch merge of
K experts and an incremental merge that adds expert K+1 to saved accumulators run the same operations,
so their results are identical.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

State = dict[str, torch.Tensor]


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ScaledParams(MethodParams):
    scale: float = Field(1.0, alias="lambda", description="global scale λ of the merged task vector")


class LinearParams(ScaledParams):
    normalize: bool = Field(False, description="divide the weighted sum by the sum of weights")


class DensityParams(ScaledParams):
    density: float = Field(gt=0, le=1, description="fraction of each task vector's entries kept")
    rescale: bool = Field(False, description="scale each trimmed task vector back to its L1 norm before trimming")


class DropParams(DensityParams):
    """Random drops (DARE, DELLA): density is each entry's keep probability."""

    rescale: bool = Field(True, description="divide each kept entry by its keep probability, so the task vector "
                          "keeps its expected value")


class DisjointParams(MethodParams):
    """The TIES family's sign election."""

    normalize: bool = Field(True, description="divide the elected entries' weighted sum by their weights (the "
                            "disjoint mean); false: their weighted sum, as mergekit's normalize: false")


class Method:
    """What every merge method declares: its name, its params and which experts and weights it takes."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    allows_negative_weights: ClassVar[bool] = False
    takes_weights: ClassVar[bool] = True  # False: the maths has no per-expert weight, so only 1 is accepted
    min_experts: ClassVar[int] = 1
    max_experts: ClassVar[int | None] = None

    def __init__(self, params: MethodParams, seed: int = 0):
        self.params = params
        self.seed = seed


class MergeMethod(Method, ABC):
    state_names: ClassVar[tuple[str, ...]]

    def sparsify(self, delta: torch.Tensor, tensor_name: str, expert_index: int) -> torch.Tensor:
        """The part of one expert's task vector that enters the merge (all of it by default)."""
        return delta

    def state_shape(self, key: str, shape: torch.Size) -> tuple[int, ...]:
        """The shape of accumulator `key` for a tensor of `shape` (the tensor's own by default)."""
        return tuple(shape)

    @abstractmethod
    def add(self, state: State, delta: torch.Tensor, weight: float) -> None:
        """Fold one expert's (sparsified, float32) task vector into the accumulators, in place."""

    @abstractmethod
    def delta(self, state: State, total_weight: float, base: torch.Tensor) -> torch.Tensor:
        """The merged task vector from the accumulators; total_weight is the sum of all experts' weights and
        base the base tensor (float32, read only). It may reuse the accumulators' memory: the state is not used
        afterwards."""


class WeightedSum(MergeMethod):
    """Accumulates S = Σ wi τi: the shared state of the linear methods."""

    state_names = ("sum",)

    def add(self, state: State, delta: torch.Tensor, weight: float) -> None:
        state["sum"].add_(delta, alpha=weight)
