"""Calibration settings as data: the released Expert Merging defaults, validated field by field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator

from merging.errors import ConfigError
from merging.methods.base import MethodParams

# Kept at the base's value: the paper merges the blocks' linear layers only.
DEFAULT_EXCLUDE = ("*embed_tokens*", "*lm_head*", "*norm*", "*.bias")
HiddenLayer = int | Literal["middle", "last"]
Gamma = Annotated[float, Field(ge=0)] | Literal["auto"]
Coefficient = Annotated[float, Field(gt=0, lt=1)]


class CalibrationParams(MethodParams):
    """`params:` of expert_merging / expert_merging_pp."""

    samples_per_expert: int = Field(8, gt=0, description="calibration samples drawn per expert (seeded)")
    init: float | Literal["auto"] = Field(
        "auto", description="ᾱ: every coefficient starts here; the L1 pull aims here. auto: the Task Arithmetic λ of "
        "init_grid whose merge has the lowest CE on the held-out calibration samples (the paper's ᾱ is the TA "
        "coefficient)")
    init_grid: list[Coefficient] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5, 0.7, 0.9], min_length=1,
                                         description="init: auto: the λ values tried")
    gamma: Gamma = Field(
        "auto", description="weight of the L1 pull of the coefficients towards init; auto: the one of gamma_grid "
        "whose merge has the lowest CE on held-out calibration samples (the paper's 0.8 when none can be held out)")
    gamma_grid: list[float] = Field(default_factory=lambda: [0.0, 0.8, 5.0], min_length=1,
                                    description="gamma: auto: the values tried")
    holdout: float = Field(0.25, gt=0, lt=1, description="gamma: auto: the share of each expert's calibration "
                           "samples held out to score the candidates (at least one, when the expert has two)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of the logit KL (scaled by T²)")
    hidden_layers: list[HiddenLayer] = Field(default_factory=lambda: ["middle"],
                                             description="hidden_states indices aligned by MSE (0 = embeddings)")
    hidden_weight: float = Field(1.0, ge=0, description="w_h: weight of the hidden-state MSE")
    lr: float = Field(0.5, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    epochs: int = Field(1, gt=0)
    grad_accumulation: int = Field(8, gt=0, description="samples per optimizer step (batch size 1)")
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null: no clipping")
    restart_period: int = Field(50, gt=0, description="T_0 of the cosine warm restarts, in optimizer steps")
    restart_growth: int = Field(2, ge=1, description="T_mult of the cosine warm restarts")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="eta_min as a fraction of lr")
    budget: float = Field(1.0, gt=0, description="EM++: chunk coefficients per expert ≈ budget × tensors")
    kappa: float = Field(1.0, ge=0, description="EM++: importance exponent; higher concentrates chunks")
    stage2_init: Literal["stage1", "init"] = Field("stage1", description="EM++: warm start of stage 2")
    coefficients: Literal["tensor", "rank"] = Field(
        "tensor", description="tensor: one α per (tensor, expert) (EM++: per row block); rank: one α per rank-1 "
        "component of each LoRA adapter on the tensors whose every expert update is LoRA factors (EM++: stage 1 per "
        "tensor, stage 2 per component on the tensors the allocation picks); other tensors keep per-tensor α")
    activation: Literal["sigmoid", "clamp"] = Field(
        "sigmoid", description="α from the trained r: sigmoid(r) (Expert Merging) or clamp(r, 0, 1) (AdaMerging)")
    keep_epochs: list[int] = Field(default_factory=list, description="also write the coefficients after these "
                                   "epochs (the last stage's), as epochs/coefficients-epoch-E.json")
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE),
                               description="tensor-name patterns kept at the base's value")
    mode: Literal["full", "blockwise"] = Field(
        "full", description="blockwise: one transformer block at a time (hidden states only), for big models")
    task_vectors: Literal["auto", "resident", "streamed"] = Field(
        "auto", description="how the experts' updates are held (full mode): auto = LoRA adapters factored, full "
        "checkpoints' task vectors resident if they fit memory_budget_mb, else streamed; resident = every task "
        "vector dense on the device (adapters too); streamed = full checkpoints read per tensor as layers run")
    memory_budget_mb: float | None = Field(None, gt=0, description="memory calibration may use (device memory "
                                           "on a GPU, RAM on the CPU); default: what the device has available")
    teachers: Literal["auto", "cached", "top_k", "recomputed"] = Field(
        "auto", description="cached: each expert's outputs computed once and kept on the host in the compute dtype; "
        "top_k: only each position's teacher_top_k most likely tokens kept (KL over them and the rest as one "
        "bucket); recomputed: one more forward with that expert switched on, per sample; auto = cached when the "
        "cache fits teacher_cache_mb, else recomputed when every expert is an adapter asked once (one epoch, one "
        "stage: the same cost), else top_k")
    teacher_cache_mb: float = Field(1024, gt=0, description="auto keeps whole teacher outputs up to this size")
    teacher_top_k: int = Field(64, gt=0, description="tokens kept per position by teachers: top_k")
    lora_out: bool = Field(False, description="every expert a LoRA adapter: write the merge as one PEFT adapter "
                           "of rank Σ r_k (each B_k's rows scaled by their coefficients), exact, not a checkpoint")
    warm_start: Path | None = Field(None, description="coefficients.json of an earlier calibration over some of "
                                    "these experts: start from its α (experts matched by name; new ones at init) "
                                    "and, for EM++, keep its chunks and train stage 2 only")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype: auto = float32 on CPU, bfloat16 on GPU")
    seed: int | None = Field(None, description="sample choice and order; default: the config's seed")

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if device != "auto":
            try:
                torch.device(device)
            except RuntimeError as exc:
                raise ValueError(f"{device!r} is not a torch device (auto, cpu, cuda, cuda:0)") from exc
        return device

    @field_validator("init")
    @classmethod
    def _inside_0_1(cls, init: float | str) -> float | str:
        if init != "auto" and not 0 < init < 1:
            raise ValueError("Input should be greater than 0" if init <= 0 else "Input should be less than 1")
        return init

    @field_validator("gamma_grid")
    @classmethod
    def _non_negative(cls, grid: list[float]) -> list[float]:
        if any(g < 0 for g in grid):
            raise ValueError("every γ must be >= 0")
        return grid

    @field_validator("keep_epochs")
    @classmethod
    def _within_training(cls, epochs: list[int], info: ValidationInfo) -> list[int]:
        total = info.data.get("epochs", 1)
        outside = [e for e in epochs if not 1 <= e <= total]
        if outside:
            raise ValueError(f"epoch {outside[0]} is outside 1..epochs ({total})")
        return sorted(set(epochs))

    @field_validator("hidden_layers")
    @classmethod
    def _distinct(cls, layers: list[HiddenLayer]) -> list[HiddenLayer]:
        if len(set(layers)) != len(layers):
            raise ValueError("lists a layer twice")
        return layers

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def layer_indices(self, num_hidden_layers: int, source: str) -> list[int]:
        """hidden_states indices: 0 is the embeddings, i the output of block i."""
        named = {"middle": num_hidden_layers // 2, "last": num_hidden_layers}
        indices = [named[layer] if isinstance(layer, str) else layer for layer in self.hidden_layers]
        for index in indices:
            if not 0 <= index <= num_hidden_layers:
                raise ConfigError(f"{source}: params.hidden_layers: {index} is out of range; the model has "
                                  f"hidden states 0..{num_hidden_layers}")
        return sorted(set(indices))


class AdaMergingParams(CalibrationParams):
    """`params:` of adamerging: layer-wise α = clamp(r, 0, 1) that minimise the entropy of the merged model's
    next-token predictions on the same unlabeled samples; no teachers, no pull (AdaMerging, Yang et al. 2024)."""

    init: float | Literal["auto"] = Field(0.3, description="every α starts here (the paper's 0.3); auto: as for "
                                          "expert_merging")
    gamma: Gamma = Field(0.0, description="weight of an L1 pull towards init (AdaMerging has "
                                           "none); auto picks it as for expert_merging")
    hidden_layers: list[HiddenLayer] = Field(default_factory=list, description="unused: no teachers")
    hidden_weight: float = Field(0.0, ge=0, le=0, description="unused: no teachers")
    lr: float = Field(0.01, gt=0, description="Adam's step on α itself (the paper: 1e-3 over 500 steps)")
    weight_decay: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(1.0, ge=0, le=1, description="1: constant lr, as the paper")
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm; null: no clipping (the paper)")
    activation: Literal["sigmoid", "clamp"] = Field("clamp", description="α from r: clamp(r, 0, 1) as the paper")
    mode: Literal["full"] = Field("full", description="the entropy needs the whole model's logits")
    coefficients: Literal["tensor"] = Field("tensor", description="one α per (tensor, expert), as the paper")


def params_for(method: str) -> type[CalibrationParams]:
    return AdaMergingParams if method == "adamerging" else CalibrationParams
