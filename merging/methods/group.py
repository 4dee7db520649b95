"""The interface of the methods that need every input's tensor at once (not a fold over task vectors).

SLERP-like interpolations over several models, Karcher means, SCE's variance selection and the like read all
inputs of one tensor together, so the merge loop hands them the base tensor and each expert's full tensor
(θ0 + τi, float32) and takes the merged tensor back. Such a method has no accumulators: it cannot add an expert to
a saved merge, and sweeps (which fold prefixes) refuse it by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from merging.methods.base import Method


class GroupMethod(Method, ABC):
    @abstractmethod
    def merge(self, base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
              tensor_name: str) -> torch.Tensor:
        """The merged tensor (float32, the base's shape) from the base tensor and each expert's full tensor (all
        float32, read only), with each expert's weight. TENSOR_NAME seeds any randomness."""
