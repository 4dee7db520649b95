"""Calibration on the whole merged model: choose how the experts' updates are held, build the teachers, train.

Layouts (params.task_vectors): `resident` holds every expert's task vector dense on the device (adapters too:
the reference path); `factored` keeps adapters as factors and full checkpoints' task vectors resident; `streamed`
keeps adapters as factors and reads full checkpoints per tensor as the layers run. `auto` takes factored when
its memory account fits params.memory_budget_mb (default: the device's free memory), else streamed, and says
what the smallest layout needs when even that does not fit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from merging.calibration.components import component_experts, pull_weights
from merging.calibration.expert_merging import (
    MergedModel,
    StageResult,
    TrainableCoefficients,
    full_model_student,
    train_stage,
)
from merging.calibration.memory import ModelShape, account, available_mb, teacher_cache_bytes
from merging.calibration.params import CalibrationParams
from merging.calibration.samples import Sample
from merging.calibration.sources import factorable, load_sources
from merging.calibration.teachers import Teachers
from merging.errors import ConfigError
from merging.experts import Expert, FullCheckpoint, LoraAdapter
from merging.io.checkpoint import CheckpointReader
from merging.io.hf_loading import load_causal_lm

log = logging.getLogger("mergeplan")


def _teacher_uses(method: str, params: CalibrationParams) -> int:
    """How many times each sample's teacher is asked for: once per epoch of each stage."""
    return params.epochs * (2 if method == "expert_merging_pp" and params.warm_start is None else 1)


def teacher_policy(method: str, params: CalibrationParams, experts: list[Expert], cache_mb: float) -> str:
    """cached, top_k or recomputed (params.teachers, or auto's choice from the whole cache's size)."""
    if params.teachers != "auto":
        return params.teachers
    if cache_mb <= params.teacher_cache_mb:
        return "cached"
    adapters_only = all(isinstance(e, LoraAdapter) for e in experts)
    return "recomputed" if adapters_only and _teacher_uses(method, params) == 1 else "top_k"


def memory_accounts(model: torch.nn.Module, base: CheckpointReader, experts: list[Expert], names: list[str],
                    samples: list[Sample], teacher_cache: int, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """The memory account (MB per part) of each layout, from shapes; teacher_cache: its bytes on the device."""
    linear = [n for n in names if factorable(model, n)]
    shapes = [base.tensors[n].shape for n in linear]
    full = sum(isinstance(e, FullCheckpoint) for e in experts)
    ranks = [max(e.ranks, default=0) for e in experts if isinstance(e, LoraAdapter)]
    common = {"dtype_bytes": torch.finfo(dtype).bits // 8, "tokens": max(s.input_ids.numel() for s in samples),
              "linear_numel": sum(a * b for a, b in shapes), "linear_rows_and_columns": sum(a + b for a, b in shapes),
              "largest_linear": max((a * b for a, b in shapes), default=0), "teacher_cache": teacher_cache,
              "eager_attention": model.config._attn_implementation == "eager"}
    shape = model_shape(model)
    return {
        "resident": account(shape, adapter_ranks=[], dense_experts=len(experts), streamed_experts=0, **common),
        "factored": account(shape, adapter_ranks=ranks, dense_experts=full, streamed_experts=0, **common),
        "streamed": account(shape, adapter_ranks=ranks, dense_experts=0, streamed_experts=full, **common),
    }


def model_shape(model: torch.nn.Module) -> ModelShape:
    return ModelShape.of(model.config, sum(p.numel() for p in model.parameters()))


def teacher_cache(method: str, params: CalibrationParams, experts: list[Expert], samples: list[Sample],
                  hidden_layers: int, model: torch.nn.Module, dtype: torch.dtype) -> tuple[str | None, int]:
    """(teacher policy, bytes of its cache)."""
    if method == "adamerging":
        return None, 0
    tokens, size = sum(s.input_ids.numel() for s in samples), torch.finfo(dtype).bits // 8
    whole = teacher_cache_bytes(model_shape(model), tokens, hidden_layers, size, None)
    policy = teacher_policy(method, params, experts, whole / 2**20)
    top_k = params.teacher_top_k if policy == "top_k" else None
    return policy, 0 if policy == "recomputed" else teacher_cache_bytes(model_shape(model), tokens, hidden_layers,
                                                                       size, top_k)


def choose_layout(params: CalibrationParams, accounts: dict[str, dict[str, float]], budget_mb: float,
                  source: str) -> str:
    if params.task_vectors == "resident":
        return "resident"
    need = {layout: sum(parts.values()) for layout, parts in accounts.items()}
    if params.task_vectors == "auto" and need["factored"] <= budget_mb:
        return "factored"
    if need["streamed"] > budget_mb:
        parts = ", ".join(f"{part.removesuffix('_mb')} {mb:.0f}" for part, mb in accounts["streamed"].items() if mb)
        raise ConfigError(f"{source}: params.memory_budget_mb: {budget_mb:.0f} MB is too small: the smallest "
                          f"full-model layout (adapters factored, full experts streamed) needs about "
                          f"{need['streamed']:.0f} MB ({parts}); raise the budget, shorten the calibration "
                          "samples, or set params.mode: blockwise (one transformer block at a time)")
    return "streamed"


class FullModelRunner:
    """Runs a calibration stage on the whole merged model: logit KL + hidden MSE against the teachers (Expert
    Merging), or the entropy of the merged model's own predictions (AdaMerging: no teachers)."""

    def __init__(self, method: str, base_folder, base: CheckpointReader, experts: list[Expert], names: list[str],
                 samples: list[Sample], layers: list[int], task_weights: list[float], params: CalibrationParams,
                 seed: int, device: torch.device, dtype: torch.dtype, source: str):
        budget = params.memory_budget_mb or available_mb(device)
        model = load_causal_lm(base_folder, dtype).to(device).eval().requires_grad_(False)
        policy, cache = teacher_cache(method, params, experts, samples, len(layers), model, dtype)
        self.accounts = memory_accounts(model, base, experts, names, samples, cache if device.type == "cpu" else 0,
                                        dtype)
        self.layout = choose_layout(params, self.accounts, budget, source)
        sources = load_sources(base, experts, names, model, factored=self.layout != "resident",
                               streamed=self.layout == "streamed", device=device, dtype=dtype)
        self.megabytes = {"base_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
                          **sources.megabytes, "teacher_cache_mb": 0.0}
        self.model = MergedModel(model, sources.sources, len(experts))
        # tensor -> the expert of each LoRA component, where params.coefficients: rank trains one α per component
        self.components = component_experts(sources.sources, len(experts)) if params.coefficients == "rank" else {}
        self.pull = {name: pull_weights(experts) for name, experts in self.components.items()}
        self.task_vector_l1 = {n: s.l1.to(device) for n, s in sources.sources.items()}
        self.teachers = None
        if policy is not None:
            self.teachers = Teachers(self.model, self.model.one_hot, experts, base, names, samples, layers,
                                     params.temperature, policy, params.teacher_top_k, device, dtype)
            self.megabytes |= self.teachers.megabytes()
        self.student = full_model_student(self.model, self.teachers, layers, params.temperature)
        self.samples, self.task_weights, self.params, self.seed = samples, task_weights, params, seed
        log.info("calibration layout: %s (%s)%s", self.layout,
                 ", ".join(f"{part.removesuffix('_mb')} {mb:.0f} MB" for part, mb in self.megabytes.items() if mb),
                 "" if self.teachers is None else f"; teachers {self.teachers.policy}")

    def run(self, name: str, raw: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
            keep_epochs: frozenset[int] = frozenset()) -> StageResult:
        coefficients = TrainableCoefficients(raw, fixed, self.params.activation, self.pull)
        report = train_stage(name, coefficients, self.samples, self.student, self.task_weights, self.params,
                             self.seed, keep_epochs)
        return StageResult({n: a.detach() for n, a in coefficients.alpha().items()},
                           {n: coefficients.raw_value(n) for n in coefficients.trained}, [report])

    @contextmanager
    def trained_on(self, samples: list[Sample], params: CalibrationParams) -> Iterator[None]:
        """Stages run in the block train on SAMPLES (a subset of the runner's: their teachers are built) with
        PARAMS."""
        kept = self.samples, self.params
        self.samples, self.params = samples, params
        try:
            yield
        finally:
            self.samples, self.params = kept

    @torch.no_grad()
    def merged_ce(self, alpha: dict[str, torch.Tensor], samples: list[Sample]) -> float:
        """Next-token cross-entropy (nats per token) of the model merged with ALPHA on SAMPLES."""
        weights = self.model.merged(alpha)
        device = next(iter(self.model.base.values())).device
        total, tokens = 0.0, 0
        for sample in samples:
            ids = sample.input_ids.to(device)
            logits = self.model(weights, ids, hidden=False).logits[0].float()
            total += F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
        return total / max(tokens, 1)

    def report(self) -> dict:
        return {"layout": self.layout,
                "teachers": None if self.teachers is None else self.teachers.policy,
                **{part: round(mb, 2) for part, mb in self.megabytes.items()},
                "predicted_mb": {layout: {p: round(mb, 1) for p, mb in parts.items()}
                                 for layout, parts in self.accounts.items()}}
