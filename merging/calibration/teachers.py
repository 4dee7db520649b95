"""Teachers without a second model: expert k is the merged model at α = one-hot(k), plus what expert k changes
outside the calibrated tensors (an adapter's modules_to_save, a full checkpoint's norms and embeddings).

cached: each expert's outputs on its own samples are computed once, one expert's extra tensors on the device at a
time, and kept on the host in the compute dtype. recomputed: one more forward pass per sample with that expert
switched on (no cache at all; with adapters, the extra tensors are small and stay on the device).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from merging.calibration.samples import Sample
from merging.experts import Expert, LoraAdapter
from merging.io.checkpoint import CheckpointReader

log = logging.getLogger("mergeplan")


@dataclass
class TeacherOutput:
    log_probs: torch.Tensor  # (length, vocab): log softmax(z / T) of the expert
    hidden: list[torch.Tensor]  # (length, hidden) at each aligned layer


def outside_changes(expert: Expert, base: CheckpointReader, names: list[str], device: torch.device,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The expert's own values of the tensors it changes that calibration does not merge."""
    calibrated = set(names)
    if isinstance(expert, LoraAdapter):
        candidates = [n for n in expert.changes if n not in calibrated and n in base.tensors]
    else:
        candidates = [n for n in base.names() if n not in calibrated and base.tensors[n].dtype.is_floating_point]
    changes = {}
    for name in candidates:
        value = expert.weights(name, base)
        if isinstance(expert, LoraAdapter) or not torch.equal(value, base.read(name)):
            changes[name] = value.to(device, dtype)
    return changes


def teacher_output(logits: torch.Tensor, hidden_states, layers: list[int], temperature: float) -> TeacherOutput:
    log_probs = F.log_softmax(logits[0].float() / temperature, dim=-1).to(logits.dtype)
    return TeacherOutput(log_probs, [hidden_states[i][0] for i in layers])


class Teachers:
    """teacher(sample) -> TeacherOutput, cached on the host or recomputed, from `run(weights, input_ids)`, the
    student's forward pass given its merged weights (here: the one-hot merge of one expert)."""

    def __init__(self, run, one_hot, experts: list[Expert], base: CheckpointReader, names: list[str],
                 samples: list[Sample], layers: list[int], temperature: float, recompute: bool,
                 device: torch.device, dtype: torch.dtype):
        self.run, self.one_hot, self.layers, self.temperature = run, one_hot, layers, temperature
        self.recompute, self.device = recompute, device
        self.cache: dict[int, TeacherOutput] = {}
        self.extras: dict[int, dict[str, torch.Tensor]] = {}
        taught = sorted({sample.expert for sample in samples})
        for k in taught:
            extras = outside_changes(experts[k], base, names, device, dtype)
            if recompute:
                self.extras[k] = extras
                continue
            weights = self._weights(k, extras)
            for sample in samples:
                if sample.expert == k:
                    output = self._forward(weights, sample)
                    self.cache[id(sample)] = TeacherOutput(output.log_probs.cpu(), [h.cpu() for h in output.hidden])

    def _weights(self, k: int, extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self.one_hot(k) | extras

    @torch.no_grad()
    def _forward(self, weights: dict[str, torch.Tensor], sample: Sample) -> TeacherOutput:
        out = self.run(weights, sample.input_ids.to(self.device), bool(self.layers))
        return teacher_output(out.logits, out.hidden_states, self.layers, self.temperature)

    def __call__(self, sample: Sample) -> TeacherOutput:
        if self.recompute:
            return self._forward(self._weights(sample.expert, self.extras[sample.expert]), sample)
        cached = self.cache[id(sample)]
        return TeacherOutput(cached.log_probs.to(self.device), [h.to(self.device) for h in cached.hidden])

    def megabytes(self) -> dict[str, float]:
        def size(tensors) -> float:
            return sum(t.numel() * t.element_size() for t in tensors) / 2**20

        cached = [t for output in self.cache.values() for t in (output.log_probs, *output.hidden)]
        return {"teacher_cache_mb": size(cached),
                "teacher_extras_mb": size(t for extras in self.extras.values() for t in extras.values())}
