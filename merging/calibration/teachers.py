"""Teachers without a second model: expert k is the merged model at α = one-hot(k), plus what expert k changes
outside the calibrated tensors (an adapter's modules_to_save, a full checkpoint's norms and embeddings).

cached: each expert's outputs on its own samples are computed once, one expert's extra tensors on the device at a
time, and kept on the host in the compute dtype. top_k: the same, keeping each position's k most likely tokens
(log-probabilities and ids): the logit loss is then the KL over those k tokens and one bucket for the rest of
the vocabulary. recomputed: one more forward pass per sample with that expert switched on (no cache at all; with
adapters, the extra tensors are small and stay on the device).
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
    log_probs: torch.Tensor  # (length, vocab): log softmax(z / T) of the expert; (length, k) with top_k
    hidden: list[torch.Tensor]  # (length, hidden) at each aligned layer
    top_k: torch.Tensor | None = None  # (length, k): the token ids of log_probs' columns; None: every token

    def kept(self, k: int | None) -> TeacherOutput:
        """On the host, whole or its k most likely tokens per position."""
        if k is None or k >= self.log_probs.shape[-1]:
            return TeacherOutput(self.log_probs.cpu(), [h.cpu() for h in self.hidden])
        values, ids = self.log_probs.topk(k, dim=-1)
        return TeacherOutput(values.cpu(), [h.cpu() for h in self.hidden], ids.cpu())

    def to(self, device: torch.device) -> TeacherOutput:
        return TeacherOutput(self.log_probs.to(device), [h.to(device) for h in self.hidden],
                             None if self.top_k is None else self.top_k.to(device))


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


def logit_kl(logits: torch.Tensor, teacher: TeacherOutput) -> torch.Tensor:
    """KL(teacher ‖ softmax(logits)) summed over positions; logits: (length, vocab) float32. With a top-k teacher:
    over its k tokens and one bucket holding the rest of the vocabulary (exact when k = vocab); the student's
    log-probabilities are then only formed at those k tokens (no second (length, vocab) tensor)."""
    target = teacher.log_probs.float()
    if teacher.top_k is None:
        return F.kl_div(F.log_softmax(logits, dim=-1), target, log_target=True, reduction="sum")
    kept = logits.gather(-1, teacher.top_k) - torch.logsumexp(logits, dim=-1, keepdim=True)
    target_rest, kept_rest = (_log_rest(values) for values in (target, kept))
    return (target.exp() * (target - kept)).sum() + (target_rest.exp() * (target_rest - kept_rest)).sum()


def _log_rest(log_probs: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(log_probs)) per position: the log-mass outside the kept tokens (kept finite)."""
    return torch.log(-torch.expm1(torch.logsumexp(log_probs, dim=-1).clamp(max=-1e-9)))


class Teachers:
    """teacher(sample) -> TeacherOutput, cached on the host or recomputed, from `run(weights, input_ids)`, the
    student's forward pass given its merged weights (here: the one-hot merge of one expert)."""

    def __init__(self, run, one_hot, experts: list[Expert], base: CheckpointReader, names: list[str],
                 samples: list[Sample], layers: list[int], temperature: float, policy: str, top_k: int,
                 device: torch.device, dtype: torch.dtype):
        self.run, self.one_hot, self.layers, self.temperature = run, one_hot, layers, temperature
        self.policy, self.device = policy, device
        self.recompute = policy == "recomputed"
        keep = top_k if policy == "top_k" else None
        self.cache: dict[int, TeacherOutput] = {}
        self.extras: dict[int, dict[str, torch.Tensor]] = {}
        taught = sorted({sample.expert for sample in samples})
        for k in taught:
            extras = outside_changes(experts[k], base, names, device, dtype)
            if self.recompute:
                self.extras[k] = extras
                continue
            weights = self._weights(k, extras)
            for sample in samples:
                if sample.expert == k:
                    self.cache[id(sample)] = self._forward(weights, sample).kept(keep)

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
        return self.cache[id(sample)].to(self.device)

    def megabytes(self) -> dict[str, float]:
        def size(tensors) -> float:
            return sum(t.numel() * t.element_size() for t in tensors) / 2**20

        cached = [t for output in self.cache.values() for t in (output.log_probs, *output.hidden, output.top_k)
                  if t is not None]
        return {"teacher_cache_mb": size(cached),
                "teacher_extras_mb": size(t for extras in self.extras.values() for t in extras.values())}
