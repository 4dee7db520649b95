"""A calibrated merge of LoRA experts written as one PEFT LoRA adapter, exactly (`params.lora_out: true`).

The dense merge of a calibrated tensor is θ0 + Σk diag(c_k)·s_k·B_k@A_k, with c_k expert k's coefficient per
row (row blocks: merging/methods/learned.py) and s_k its PEFT scale. That update is B_cat@A_cat with
A_cat = [A_1; …; A_K] (stacked rows) and B_cat = [c_1·s_1·B_1, …, c_K·s_K·B_K] (side by side): rank Σ r_k, saved
with lora_alpha = rank so PEFT's scale is 1. Per-component coefficients (params.coefficients: rank) scale B_k's
columns instead: B_cat = [B_1·diag(α_1·s_1), …]. An embedding's update is (B@A)ᵀ, its rows are A's columns, so there
c_k·s_k scales A_k's columns instead. A module with a calibrated tensor that is not low-rank (an adapter's
modules_to_save copy, a lora_B bias) is written whole, with its merged values, through PEFT's modules_to_save.
Tensors without coefficients keep the base's value in the dense merge, so the adapter leaves them out.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from merging.calibration.coefficients import Coefficients, write_calibration_artifacts
from merging.calibration.components import ComponentScaled, scaled_b, split
from merging.errors import ConfigError
from merging.experts import ADAPTER_CONFIG, PEFT_PREFIX, Expert, LoraAdapter, LoraFactors, TensorChange
from merging.io.checkpoint import CheckpointReader, CheckpointWriter
from merging.io.safetensors_file import read_tensor
from merging.lora_export import adapter_config
from merging.methods.learned import row_coefficients

log = logging.getLogger("mergeplan")
SERVING_RANK_CAP = 512  # vLLM's max_lora_rank tops out here; most serving engines have a similar cap


def _module(tensor: str) -> str:
    return tensor.rsplit(".", 1)[0]


def _is_embedding(factors: LoraFactors) -> bool:
    # peft names an embedding's factors lora_embedding_A/B; a transposed pair with other names is fan_in_fan_out
    return "lora_embedding_A" in factors.a.name


def _ties_embeddings(base: CheckpointReader) -> bool:
    # transformers' config class knows the model's default when config.json leaves tie_word_embeddings out
    from merging.io.hf_loading import load_model_config

    return bool(getattr(load_model_config(base.folder), "tie_word_embeddings", False))


def check_lora_experts(experts: list[Expert], calibrated: list[str], base: CheckpointReader,
                       source: str) -> list[LoraAdapter]:
    """Refuse, before any calibration, the inputs a merged adapter cannot express exactly."""
    adapters = [expert for expert in experts if isinstance(expert, LoraAdapter)]
    if len(adapters) != len(experts):
        full = next(expert for expert in experts if not isinstance(expert, LoraAdapter))
        raise ConfigError(f"{source}: params.lora_out: expert {full.folder} is a full checkpoint, not a LoRA "
                          "adapter; set lora_out: false (write a dense checkpoint) or give only LoRA adapters")
    names = set(calibrated)
    for expert in adapters:
        for name, change in expert.changes.items():
            lora = change.factors
            if name in names and lora is not None and lora.transposed and not _is_embedding(lora):
                raise ConfigError(f"{source}: params.lora_out: {name} of {expert.folder} is a fan_in_fan_out "
                                  "(Conv1D) LoRA, which lora_out does not write; set lora_out: false or add it to "
                                  "params.exclude")
    touched = sorted({name for expert in adapters for name in expert.changes if name in names and "embed" in name})
    if touched and _ties_embeddings(base):
        # the dense merge moves the tied output layer with the embedding; an adapter's embedding change does not
        raise ConfigError(f"{source}: params.lora_out: the base ties its output layer to {touched[0]}, which an "
                          "adapter changes; add it to params.exclude or set lora_out: false")
    return adapters


def _moves_beyond_factors(change: TensorChange, name: str, base: CheckpointReader) -> bool:
    if change.bias_of is not None:
        return True
    # peft saves an embedding's base layer beside its factors (save_embedding_layers); equal to the base, it is
    # no change, and writing it whole would put a vocabulary-sized matrix into the adapter for nothing
    return change.replacement is not None and not torch.equal(read_tensor(change.replacement), base.read(name))


def dense_modules(experts: list[LoraAdapter], calibrated: set[str], base: CheckpointReader) -> set[str]:
    """Modules with a calibrated tensor that some adapter changes other than by low-rank factors."""
    return {_module(name) for expert in experts for name, change in expert.changes.items()
            if name in calibrated and _moves_beyond_factors(change, name, base)}


def merged_factors(alpha: torch.Tensor, experts: list[LoraAdapter], tensor: str, rows: int,
                   ranks: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """(A_cat, B_cat, is_embedding) of one tensor, or None when no adapter has factors on it. RANKS: alpha is
    one coefficient per component (calibration/components.py): they scale B_k's columns."""
    components = None if ranks is None else split(alpha, ranks)
    coefficient = None if ranks is not None else row_coefficients(alpha.float(), rows)  # (K, rows)
    a_parts, b_parts, embedding = [], [], False
    for k, expert in enumerate(experts):
        change = expert.changes.get(tensor)
        if change is None or change.factors is None:
            continue  # this adapter leaves the tensor alone: it adds no rank here
        lora = change.factors
        a, b = read_tensor(lora.a).float(), read_tensor(lora.b).float()
        if components is not None:
            a_parts.append(a)
            b_parts.append(scaled_b(b, components[k], lora.scale))
            continue
        scale = lora.scale * coefficient[k]
        embedding = _is_embedding(lora)
        a_parts.append(a * scale[None, :] if embedding else a)
        b_parts.append(b if embedding else b * scale[:, None])
    if not a_parts:
        return None
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1), embedding


def merged_tensor(alpha: torch.Tensor, experts: list[LoraAdapter], tensor: str, base: CheckpointReader,
                  ranks: list[int] | None = None) -> torch.Tensor:
    """θ0 + Σk c_k·τ_k, each row of τ_k times its coefficient: the dense merge's value of one tensor (float32);
    with RANKS, θ0 + Σk B_k·diag(α_k·s_k)·A_k."""
    theta0 = base.read(tensor).float()
    if ranks is not None:
        merged = theta0.clone()
        for expert, part in zip(experts, split(alpha, ranks), strict=True):
            vector = ComponentScaled(expert, {tensor: part} if part.numel() else {}).read_task_vector(tensor, theta0)
            if vector is not None:
                merged.add_(vector)
        return merged
    rows = theta0.shape[0] if theta0.dim() else 1
    coefficient = row_coefficients(alpha.float(), rows)
    merged = theta0.clone()
    for k, expert in enumerate(experts):
        vector = expert.read_task_vector(tensor, theta0)
        if vector is not None:
            merged.view(rows, -1).add_(vector.view(rows, -1) * coefficient[k][:, None])
    return merged


def warn_high_rank(ranks: dict[str, int]) -> bool:
    """Warn (once) when a module's rank passes what serving engines load; True when it did."""
    if not ranks or max(ranks.values()) <= SERVING_RANK_CAP:
        return False
    module = max(ranks, key=ranks.__getitem__)
    log.warning("lora_out: the merged adapter has rank %d (%s); serving engines usually cap LoRA rank at %d "
                "(vLLM max_lora_rank)", ranks[module], module, SERVING_RANK_CAP)
    return True


def adapter_tensors(coefficients: Coefficients, experts: list[LoraAdapter],
                    base: CheckpointReader) -> tuple[dict[str, torch.Tensor], dict[str, int], list[str]]:
    """(peft state dict, rank per LoRA module, modules saved whole)."""
    calibrated = set(coefficients.alpha)
    whole = dense_modules(experts, calibrated, base)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name in base.names():  # checkpoint order: a stable file layout
        module = _module(name)
        if module in whole:
            # peft loads a modules_to_save module's every tensor: the merged value, or the base's where not merged
            tensors[PEFT_PREFIX + name] = (merged_tensor(coefficients.alpha[name], experts, name, base,
                                                         coefficients.ranks.get(name))
                                           if name in calibrated else base.read(name).float())
            continue
        if name not in calibrated:
            continue
        rows = (base.tensors[name].shape or (1,))[0]
        factors = merged_factors(coefficients.alpha[name], experts, name, rows, coefficients.ranks.get(name))
        if factors is None:
            continue  # no adapter touches it: the dense merge leaves it at θ0 too
        a, b, embedding = factors
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        tensors[f"{PEFT_PREFIX}{module}.{a_key}"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.{b_key}"] = b.contiguous()
        ranks[module] = a.shape[0]
    return tensors, ranks, sorted(whole)


def write_adapter(coefficients: Coefficients, experts: list[LoraAdapter], base: CheckpointReader, out: Path, *,
                  overwrite: bool = False, report: dict | None = None,
                  kept: dict[int, Coefficients] | None = None) -> Path:
    """Write `out` as one PEFT LoRA adapter equal to the dense merge of `coefficients`, with coefficients.json,
    coefficients.png and calibration.json beside it (as the dense output has them)."""
    tensors, ranks, saved = adapter_tensors(coefficients, experts, base)
    warn_high_rank(ranks)
    layout = [(key, torch.float32, tuple(tensor.shape)) for key, tensor in tensors.items()]
    # one file (peft reads adapter_model.safetensors only), staged in a sibling folder and renamed when complete
    with CheckpointWriter(out, layout, max_shard_size=sys.maxsize, overwrite=overwrite,
                          prefix="adapter_model") as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
        writer.write_json(ADAPTER_CONFIG, adapter_config(ranks, saved, base.folder))
        summary = {"rank": max(ranks.values(), default=0), "lora_modules": len(ranks), "modules_to_save": saved}
        write_calibration_artifacts(writer, coefficients, None if report is None else report | {"lora_out": summary},
                                    kept)
    log.info("wrote the calibrated merge of %d adapters as one LoRA adapter of rank %d into %s", len(experts),
             max(ranks.values(), default=0), out)
    return out
