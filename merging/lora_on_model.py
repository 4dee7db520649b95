"""A checkpoint with a PEFT LoRA adapter applied (mergekit's MODEL+LORA), read as one expert, per tensor.

The adapted model M' is what peft's merge_and_unload() of the adapter L on M would give: for each tensor, M's value
plus L's update scale·B@A (the scaling of LoraAdapter: alpha/r, alpha/√r with rsLoRA, alpha_pattern), and where L
saves a tensor whole (modules_to_save, an embedding's base_layer, a trained bias) that tensor plus its low-rank
update, if any. Its task vector against the base θ0 is τ = M' − θ0, computed tensor by tensor while streaming: the
merged copy of M is never written or held whole.
"""

from __future__ import annotations

from pathlib import Path

import torch

from merging.experts import Expert, FullCheckpoint, LoraAdapter, require_finite
from merging.io.checkpoint import CheckpointReader


class LoraOnModel(Expert):
    """The full checkpoint FOLDER with the LoRA adapter LORA applied."""

    kind = "checkpoint + LoRA"

    def __init__(self, folder: str | Path, lora: str | Path):
        self.model = FullCheckpoint(Path(folder))
        self.adapter = LoraAdapter(Path(lora))
        self.folder = self.model.folder
        self.lora_folder = self.adapter.folder

    def check_compatible(self, base: CheckpointReader) -> None:
        self.model.check_compatible(base)
        self.adapter.check_compatible(self.model.reader)  # the adapter must fit M (and so the base)

    def describe(self) -> str:
        return f"{self.model.describe()} + {self.adapter.describe()}"

    def load(self, name: str) -> tuple[torch.Tensor | None, object]:
        """(M's tensor, or None where the adapter replaces it whole; what the adapter reads for it)."""
        change = self.adapter.changes.get(name)
        model = None if change is not None and change.replacement is not None else self.model.load(name)
        return model, self.adapter.load(name)

    def task_vector(self, name: str, loaded, base_tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        model, adapter = loaded
        if model is None:  # the adapter saves this tensor whole: τ = its value (+ its update) − θ0
            return self.adapter.task_vector(name, adapter, base_tensor, out)
        if adapter is None:
            return self.model.task_vector(name, model, base_tensor, out)
        # without a replacement, the adapter's τ is its update alone, whatever base tensor it is given
        self.adapter.task_vector(name, adapter, base_tensor, out)
        out.add_(model).sub_(base_tensor)
        require_finite(out, self.folder, name)
        return out

    def weights(self, name: str, base: CheckpointReader) -> torch.Tensor:
        """M' of tensor `name`, in M's dtype."""
        own = self.model.reader.read(name)
        loaded = self.adapter.load(name)
        if loaded is None:
            return own
        own_float = own.float()
        update = self.adapter.task_vector(name, loaded, own_float, torch.empty_like(own_float))
        return update.add_(own_float).to(own.dtype)
