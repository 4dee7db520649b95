"""dare_ties: DARE drop-and-rescale of each task vector, then the TIES sign election and disjoint mean."""

import torch

from merging.methods.base import DisjointParams, DropParams
from merging.methods.sparsify import dare_drop_
from merging.methods.ties import Ties


class DareTiesParams(DropParams, DisjointParams):
    pass


class DareTies(Ties):
    name = "dare_ties"
    Params = DareTiesParams

    def sparsify(self, delta: torch.Tensor, tensor_name: str, expert_index: int) -> torch.Tensor:
        return dare_drop_(delta, self.params.density, self.seed, tensor_name, expert_index, self.params.rescale)
