"""The merged linear layer of calibration at scale: adapters applied as factors, full experts streamed.

A calibrated linear layer computes W0·x (+ b) + Σk αk·sk·Bk·(Ak·x) for its LoRA experts: one product with
the concatenated A (rank R = Σ rk), the coefficients applied in the rank space (or, for EM++ row blocks, to the
rows of B: an (out, R) scale), one product with B. Its autograd function saves only u = A·x, (tokens, R).

Full experts in the streamed layout: the layer reads their task vectors from the checkpoints when it runs, forms
W = W0 + Σk αk·τk for this layer only, and reads them again in the backward pass, where the coefficients'
gradient is ⟨∂L/∂W, τk⟩ per row block. So the device holds the base, the activations and one layer's vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from merging.calibration.sources import LowRank, StreamedVectors, TensorSources
from merging.methods.learned import combine, combine_transpose, row_length


class LowRankDelta(torch.autograd.Function):
    """Σk diag(α rows)·sk·Bk·(Ak·x) from x (..., in), A (R, in), B (out, R) and scale_alpha (1 or out, R)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale_alpha: torch.Tensor) -> torch.Tensor:
        u = F.linear(x, a)
        ctx.save_for_backward(u, a, b, scale_alpha)
        scale = scale_alpha.to(u.dtype)
        if scale.shape[0] == 1:
            return F.linear(u * scale, b)
        return F.linear(u, b * scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, a, b, scale_alpha = ctx.saved_tensors
        scale = scale_alpha.to(u.dtype)
        rank = u.shape[-1]
        if scale.shape[0] == 1:
            grad_v = grad @ b  # ∂L/∂(u·scale), (..., R)
            grad_scale = (grad_v.float() * u.float()).reshape(-1, rank).sum(dim=0, keepdim=True)
            grad_u = grad_v * scale
        else:
            scaled = b * scale
            grad_u = grad @ scaled
            grad_scale = (grad.reshape(-1, b.shape[0]).T.float() @ u.reshape(-1, rank).float()) * b.float()
        grad_x = grad_u @ a if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_scale.to(scale_alpha.dtype)


class StreamedLinear(torch.autograd.Function):
    """F.linear(x, W0 + combine(τ, α), bias) with τ read from the experts' files in forward and in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                streamed: StreamedVectors) -> torch.Tensor:
        ctx.save_for_backward(x, alpha)
        ctx.weight, ctx.streamed = weight, streamed
        return F.linear(x, _merged(weight, streamed.read(weight), alpha), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, alpha = ctx.saved_tensors
        weight = ctx.weight
        vectors = ctx.streamed.read(weight)
        grad_x = grad @ _merged(weight, vectors, alpha) if ctx.needs_input_grad[0] else None
        wide = vectors.dtype  # float32 (float64 in tests): ⟨∂L/∂W, τ⟩ sums many products
        grad_weight = grad.reshape(-1, weight.shape[0]).T.to(wide) @ x.reshape(-1, weight.shape[1]).to(wide)
        grad_alpha = combine_transpose(vectors, grad_weight.view(-1), alpha.shape[1], row_length(weight.shape))
        grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_alpha.to(alpha.dtype), grad_weight, None, None


def _merged(weight: torch.Tensor, vectors: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    delta = combine(vectors, alpha.to(vectors.dtype), row_length(weight.shape)).view(weight.shape)
    return (weight.float() + delta).to(weight.dtype) if weight.dtype != delta.dtype else weight + delta


class MergedLinear(torch.nn.Module):
    """Replaces an nn.Linear during calibration, keeping its parameters (so their names do not change).

    `alpha` (K, m) is set before each forward pass by the caller (MergedModel); `weight` may be swapped by
    functional_call for a merged weight when some experts' updates of this layer are dense."""

    def __init__(self, linear: torch.nn.Linear, sources: TensorSources):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.low_rank: LowRank | None = sources.low_rank
        self.streamed: StreamedVectors | None = sources.streamed
        self.alpha: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.streamed is not None:
            alpha = self.alpha[self.streamed.experts]
            output = StreamedLinear.apply(x, alpha, self.weight, self.bias, self.streamed)
        else:
            output = F.linear(x, self.weight, self.bias)
        if self.low_rank is not None:
            low = self.low_rank
            output = output + LowRankDelta.apply(x, low.a, low.b, low.scale_alpha(self.alpha))
        return output


class SiluGate(torch.autograd.Function):
    """silu(g)·u keeping only g and u for the backward pass (silu is recomputed): one (tokens, intermediate)
    tensor per layer fewer than autograd keeps for the two operations."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        sigmoid = torch.sigmoid(gate)
        silu = gate * sigmoid
        grad_gate = grad * up * sigmoid * (1 + gate * (1 - sigmoid))
        return grad_gate, grad * silu


class GatedMLP(torch.nn.Module):
    """A Llama-style MLP (down(silu(gate(x)) · up(x))) with SiluGate; its children keep their names."""

    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(SiluGate.apply(self.gate_proj(x), self.up_proj(x)))


def is_gated_silu_mlp(module: torch.nn.Module, hidden_act: str | None) -> bool:
    """A Llama / Mistral / Qwen MLP: gate, up and down projections and SiLU (the model config's hidden_act)."""
    parts = ("gate_proj", "up_proj", "down_proj", "act_fn")
    return hidden_act == "silu" and all(hasattr(module, part) for part in parts)
