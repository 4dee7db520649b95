"""A merged model's task vector written back as a LoRA adapter: a truncated SVD per changed tensor.

τ = merged − base of each 2-D tensor is factored as B @ A with B = U_r·S_r and A = V_rᵀ (the best rank-r
approximation in Frobenius norm), saved in peft's layout with alpha = r, so the adapter's scale is 1. Embeddings
get peft's embedding factors (τᵀ factored). Changed tensors that are not matrices (norms, biases) cannot be
low-rank factors; they are left out and counted in the reported error.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from merging.errors import ConfigError
from merging.experts import ADAPTER_CONFIG, PEFT_PREFIX
from merging.io.checkpoint import CheckpointReader, CheckpointWriter

log = logging.getLogger("mergeplan")
EXPORT_REPORT = "lora_export.json"


def _is_embedding(name: str) -> bool:
    return name.endswith("embed_tokens.weight")


def adapter_config(ranks: dict[str, int], saved: list[str], base: Path) -> dict:
    """adapter_config.json of an adapter mergeplan writes: rank per module, lora_alpha = rank so every scale is 1;
    `saved`: modules written whole (peft's modules_to_save)."""
    rank = max(ranks.values(), default=1)
    pattern = {module: r for module, r in ranks.items() if r != rank}
    return {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": pattern,
            "target_modules": sorted(ranks), "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
            "bias": "none", "lora_dropout": 0.0, "modules_to_save": saved or None, "task_type": "CAUSAL_LM",
            "init_lora_weights": True, "base_model_name_or_path": str(base.resolve())}


def export_lora(base: str | Path, merged: str | Path, out: str | Path, rank: int, *, overwrite: bool = False) -> dict:
    """Write `out` (adapter_config.json, adapter_model.safetensors, lora_export.json); returns the report with
    the relative Frobenius error ‖τ − B@A‖ / ‖τ‖ over every changed tensor, and the worst tensor's."""
    if rank < 1:
        raise ConfigError(f"--lora-rank: {rank}; the rank must be at least 1")
    base_reader, merged_reader = CheckpointReader(base), CheckpointReader(merged)
    factors: dict[str, torch.Tensor] = {}
    modules, rank_pattern, dropped = [], {}, []
    residual_total, norm_total, worst = 0.0, 0.0, ("", 0.0)
    for name in base_reader.names():
        if not base_reader.tensors[name].dtype.is_floating_point:
            continue
        vector = merged_reader.read(name).float() - base_reader.read(name).float()
        squared_norm = float(vector.square().sum())
        if squared_norm == 0:
            continue
        norm_total += squared_norm
        if vector.dim() != 2 or not name.endswith(".weight"):
            dropped.append(name)
            residual_total += squared_norm
            continue
        embedding = _is_embedding(name)
        left, singular, right = torch.linalg.svd(vector.T if embedding else vector, full_matrices=False)
        kept = min(rank, singular.numel())
        residual = float(singular[kept:].square().sum())
        residual_total += residual
        error = math.sqrt(residual / squared_norm)
        worst = max(worst, (name, error), key=lambda item: item[1])
        module = name.removesuffix(".weight")
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        factors[f"{PEFT_PREFIX}{module}.{a_key}"] = right[:kept].contiguous()
        factors[f"{PEFT_PREFIX}{module}.{b_key}"] = (left[:, :kept] * singular[:kept]).contiguous()
        modules.append(module)
        if kept != rank:
            rank_pattern[module] = kept
    report = {"rank": rank, "tensors": len(modules), "relative_error": math.sqrt(residual_total / norm_total)
              if norm_total else 0.0, "worst_tensor": worst[0], "worst_relative_error": worst[1],
              "not_matrices_left_out": dropped}
    layout = [(key, torch.float32, tuple(tensor.shape)) for key, tensor in factors.items()]
    with CheckpointWriter(out, layout, overwrite=overwrite, prefix="adapter_model") as writer:
        for key, tensor in factors.items():
            writer.write(key, tensor)
        writer.write_json(ADAPTER_CONFIG, adapter_config({m: rank_pattern.get(m, rank) for m in modules}, [],
                                                         Path(base)))
        writer.write_json(EXPORT_REPORT, report)
    if dropped:
        log.warning("LoRA export: %d changed tensors are not matrices and are left out (e.g. %s)", len(dropped),
                    dropped[0])
    log.info("LoRA export at rank %d: relative error %.4f (worst %s: %.4f)", rank, report["relative_error"],
             worst[0], worst[1])
    return report


def merge_as_lora(config, out: str | Path, rank: int, *, overwrite: bool = False,
                  model_dir: Path | None = None) -> dict:
    """merge(config), then export the merged task vector as a rank-`rank` adapter in `out` (the dense merge
    lives only in a temporary sibling folder). MODEL_DIR: where a mergekit file's hub ids are looked up first."""
    import tempfile

    from merging.config import load_config
    from merging.errors import CheckpointError
    from merging.merger import merge

    config = load_config(config, model_dir) if isinstance(config, str | Path) else config
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: output folder exists; pass --overwrite or choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.dense-") as scratch:
        dense = merge(config, Path(scratch) / "merged")
        return export_lora(config.base, dense, out, rank, overwrite=overwrite)
