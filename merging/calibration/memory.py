"""The memory account of full-model calibration: what each part holds, predicted from shapes before loading.

Parts: the base (every parameter in the compute dtype), the adapters' factors, the dense resident task vectors
(and the merged weights built from them each step, with their gradient), one streamed layer (its experts'
float32 task vectors and a float32 base copy, twice over in the backward pass), the teacher cache, and the
activations of one sample (what autograd keeps for the backward pass, plus the logits and their float32
log-softmax). bench/calibration_scale.py --sections account checks the account against measured peaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MB = 2**20
# What autograd keeps per token and per layer for the backward pass, in units of the compute dtype: a least-squares
# fit to the bytes of every tensor saved for backward (torch.autograd.graph.saved_tensors_hooks) in the factored
# student of six random Llamas (hidden 256-512, intermediate 688-1376, 4-8 layers, 128-256 tokens, sdpa), with the
# gated MLP fused (calibration/factored.py: SiLU recomputed, so gate and up outputs are all it keeps). Eager
# attention adds one float32 copy of the attention probabilities per head.
HIDDEN_ACTIVATIONS = 6.2
INTERMEDIATE_ACTIVATIONS = 2.2
LOGIT_FLOAT32_COPIES = 3  # the student's float32 log-softmax and its gradient, the teacher's log-probs as float32


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    parameters: int  # every parameter of the base

    @classmethod
    def of(cls, config, parameters: int) -> ModelShape:
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.vocab_size, parameters)


def activations_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, eager_attention: bool) -> int:
    """What one sample of `tokens` tokens keeps between its forward and backward pass."""
    per_token = shape.layers * (HIDDEN_ACTIVATIONS * shape.hidden + INTERMEDIATE_ACTIVATIONS * shape.intermediate)
    scores = shape.layers * shape.heads * tokens * 4 if eager_attention else 0
    logits = shape.vocab * (dtype_bytes + 4 * LOGIT_FLOAT32_COPIES)
    return int(tokens * (per_token * dtype_bytes + scores + logits))


def account(shape: ModelShape, *, dtype_bytes: int, tokens: int, adapter_ranks: list[int], linear_numel: int,
            linear_rows_and_columns: int, largest_linear: int, dense_experts: int, streamed_experts: int,
            teacher_cache: int, eager_attention: bool) -> dict[str, float]:
    """MB per part. adapter_ranks: each adapter's rank (on every calibrated linear); linear_numel: the calibrated
    linear weights' entries; linear_rows_and_columns: Σ (out + in) over them; teacher_cache: its bytes on the device."""
    factors = sum(adapter_ranks) * linear_rows_and_columns * dtype_bytes
    parts = {
        "base_mb": shape.parameters * dtype_bytes,
        "factors_mb": factors,
        "task_vectors_mb": dense_experts * linear_numel * dtype_bytes,
        # dense task vectors are merged once per optimizer step: the merged weights and their gradient
        "merged_weights_mb": 2 * linear_numel * dtype_bytes if dense_experts else 0,
        "streamed_tensor_mb": 2 * 4 * (streamed_experts + 1) * largest_linear if streamed_experts else 0,
        "teacher_cache_mb": teacher_cache,
        "activations_mb": activations_bytes(shape, tokens, dtype_bytes, eager_attention),
    }
    return {part: size / MB for part, size in parts.items()}


def teacher_cache_bytes(shape: ModelShape, tokens: int, hidden_layers: int, dtype_bytes: int,
                        top_k: int | None) -> int:
    """The cached teachers of `tokens` sample tokens: log-probabilities (every token, or the top k with their
    int64 ids) and the aligned hidden states."""
    columns = shape.vocab * dtype_bytes if top_k is None else top_k * (dtype_bytes + 8)
    return tokens * (columns + hidden_layers * shape.hidden * dtype_bytes)


def available_mb(device: torch.device) -> float:
    """Free memory on the device now: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / MB
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return math.inf
