"""One base size's task vectors held in memory, from which subset merges are folded into a loaded model's
weights (no checkpoint written).

The work is shared: each expert's task vector is read once per size, and each method's per-expert part (TIES
trimming, DARE dropping) once per method; a subset merge then only folds cached tensors. DARE draws its mask
from the expert's index in the whole pool, so a subset's merge does not depend on which other experts it has.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merging.errors import CheckpointError
from merging.experts import Expert, open_expert, require_finite
from merging.io.checkpoint import CheckpointReader
from merging.methods import MergeMethod
from merging.sweep.designs import Subset
from merging.zoo.layout import SizeFamily


class TaskVectors:
    """One size's base tensors and every expert's task vector in float32, read once; subset merges fold them.

    The arithmetic is the streaming merge's (merging.streaming) for experts of weight 1, so a subset merged here
    has the same weights as `merging.merge` of that subset (for DARE: when the subset's experts are the first
    of the pool, since a merge seeds DARE by position in its own list).
    """

    def __init__(self, family: SizeFamily):
        base = CheckpointReader(family.base)
        experts = [open_expert(folder) for folder in family.expert_folders]
        for expert in experts:
            expert.check_compatible(base)
        # integer and boolean tensors are never merged (as in merging.merger): the loaded base keeps them
        self.names = [name for name, info in base.tensors.items() if info.dtype.is_floating_point]
        self.stored_dtype = {name: base.tensors[name].dtype for name in self.names}
        self.base = {name: base.read(name).float() for name in self.names}
        for name, tensor in self.base.items():
            require_finite(tensor, base.folder, name)
        self.vectors = [self._task_vector(expert) for expert in experts]

    def _task_vector(self, expert: Expert) -> dict[str, torch.Tensor]:
        """The expert's non-zero task vectors (an adapter leaves most tensors as the base has them)."""
        vectors = {name: expert.read_task_vector(name, self.base[name]) for name in self.names}
        return {name: vector for name, vector in vectors.items() if vector is not None}

    def sparsified(self, method: MergeMethod) -> list[dict[str, torch.Tensor]]:
        """Each expert's part that enters `method`'s fold; it does not depend on the subset, so it is cached."""
        return [{name: method.sparsify(tensor.clone(), name, index) for name, tensor in vector.items()}
                for index, vector in enumerate(self.vectors)]

    def merge_into(self, targets: dict[str, torch.Tensor], method: MergeMethod,
                   sparsified: list[dict[str, torch.Tensor]], subset: Subset) -> None:
        """Write base + the method's merged task vector of `subset` into `targets` (a model's state dict)."""
        for name in self.names:
            base = self.base[name]
            state = {key: base.new_zeros(method.state_shape(key, base.shape)) for key in method.state_names}
            scratch = torch.empty_like(base)
            for index in subset:
                if name not in sparsified[index]:
                    continue  # a zero task vector adds nothing to any method's accumulators
                # a method may fold the delta in place (TIES splits it by sign), so the cache is copied first
                method.add(state, scratch.copy_(sparsified[index][name]), 1.0)
            merged = base + method.delta(state, float(len(subset)), base)
            # through the stored dtype, as a checkpoint written by merge() and loaded again would be
            targets[name].copy_(merged.to(self.stored_dtype[name]))


def model_targets(model: torch.nn.Module, names: list[str], folder: Path) -> dict[str, torch.Tensor]:
    """The model's tensors (sharing storage with its parameters) that the checkpoint's tensors are copied into."""
    state = model.state_dict()
    missing = [name for name in names if name not in state]
    if missing:
        raise CheckpointError(f"{folder}: tensor {missing[0]} has no counterpart in the model loaded from it "
                              f"({len(missing)} such); the sweep needs checkpoint names that match the model's")
    return {name: state[name] for name in names}
