"""Calibration end to end: samples, cached teachers, task vectors on the device, stage 1 (and EM++ stage 2)."""

from __future__ import annotations

import fnmatch
import logging
import resource
import time
from dataclasses import dataclass, field

import torch

from merging.calibration.coefficients import Coefficients
from merging.calibration.expert_merging import (
    MergedModel,
    StageReport,
    TeacherOutput,
    TrainableCoefficients,
    logit,
    teacher_outputs,
    train_stage,
)
from merging.calibration.importance import allocate_chunks, importance
from merging.calibration.params import CalibrationParams
from merging.calibration.samples import load_samples
from merging.checkpoint import CheckpointReader
from merging.config import MergeConfig
from merging.errors import ConfigError
from merging.hf import load_causal_lm, load_tokenizer

log = logging.getLogger("mergeplan")
CALIBRATED_METHODS = ("expert_merging", "expert_merging_pp")


@dataclass
class CalibrationResult:
    coefficients: Coefficients
    stages: list[StageReport]
    report: dict = field(default_factory=dict)


def calibrated_tensors(base: CheckpointReader, merged_names: set[str], exclude: list[str]) -> list[str]:
    """The tensors that get coefficients, in checkpoint order: merged and not excluded."""
    return [name for name in base.names() if name in merged_names
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)]


def load_task_vectors(base: CheckpointReader, experts: list[CheckpointReader], names: list[str],
                      device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """(K, numel) per tensor, computed in float32 then stored once in the compute dtype on the device."""
    vectors = {}
    for name in names:
        base_tensor = base.read(name).float().view(-1)
        stacked = torch.empty((len(experts), base_tensor.numel()), dtype=dtype, device=device)
        for k, expert in enumerate(experts):
            stacked[k].copy_(expert.read(name).float().view(-1).sub_(base_tensor))
        vectors[name] = stacked
    return vectors


def _teachers(config: MergeConfig, samples, layers: list[int], temperature: float, device: torch.device,
              dtype: torch.dtype) -> list[TeacherOutput]:
    """Each expert's outputs on its own samples, one expert model in memory at a time."""
    outputs: dict[int, TeacherOutput] = {}
    for k, ref in enumerate(config.experts):
        own = [i for i, sample in enumerate(samples) if sample.expert == k]
        if not own:
            continue
        teacher = load_causal_lm(ref.path, dtype).to(device).eval()
        chosen = [samples[i] for i in own]
        for i, output in zip(own, teacher_outputs(teacher, chosen, layers, temperature), strict=True):
            outputs[i] = output
        del teacher
    return [outputs[i] for i in range(len(samples))]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS


def _nbytes(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def calibrate(config: MergeConfig, params: CalibrationParams, base: CheckpointReader,
              experts: list[CheckpointReader], names: list[str], source: str) -> CalibrationResult:
    """Learn the coefficients of `config.method` for the tensors `names`."""
    started = time.perf_counter()
    device = params.torch_device()
    dtype = params.torch_dtype(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed = config.seed if params.seed is None else params.seed
    if not any((config.base / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(f"{config.base}: no tokenizer files; calibration tokenises its samples with the base's "
                          "tokenizer: copy tokenizer.json (and tokenizer_config.json) there")
    model = load_causal_lm(config.base, dtype).to(device).eval().requires_grad_(False)
    layers = params.layer_indices(model.config.num_hidden_layers, source) if params.hidden_weight > 0 else []
    expert_names = [ref.label for ref in config.experts]
    samples = load_samples(config.calibration, expert_names, load_tokenizer(config.base), params.samples_per_expert,
                           model.config.max_position_embeddings, seed, source)
    teachers = _teachers(config, samples, layers, params.temperature, device, dtype)
    task_vectors = load_task_vectors(base, experts, names, device, dtype)
    student = MergedModel(model, task_vectors)
    task_weights = [ref.weight for ref in config.experts]

    start = torch.full((len(experts), 1), logit(params.init))
    stage1 = TrainableCoefficients({name: start.to(device) for name in names}, {})
    stages = [train_stage("expert_merging", student, stage1, samples, teachers, layers, task_weights, params, seed)]
    alpha = {name: a.detach() for name, a in stage1.alpha().items()}
    chunks = dict.fromkeys(names, 1)
    if config.method == "expert_merging_pp":
        l1 = {name: tv.abs().sum(dim=1, dtype=torch.float32) for name, tv in task_vectors.items()}
        chunks = allocate_chunks(importance(alpha, l1), {n: tv.shape[1] for n, tv in task_vectors.items()},
                                 params.budget, params.kappa)
        warm = params.stage2_init == "stage1"
        raw = {name: (stage1.raw_value(name) if warm else start.to(device)).expand(-1, m).contiguous()
               for name, m in chunks.items() if m > 0}
        fixed = {name: alpha[name] if warm else torch.full_like(alpha[name], params.init)
                 for name, m in chunks.items() if m == 0}
        if raw:
            stage2 = TrainableCoefficients(raw, fixed)
            stages.append(train_stage("expert_merging_pp", student, stage2, samples, teachers, layers,
                                      task_weights, params, seed))
            alpha = {name: a.detach() for name, a in stage2.alpha().items()}
        else:
            log.warning("expert_merging_pp: the budget %.2f gives no tensor a chunk; keeping stage 1's coefficients",
                        params.budget)
    coefficients = Coefficients(config, expert_names, {n: alpha[n].float().cpu() for n in names},
                                {n: chunks[n] > 0 for n in names})
    report = {
        "method": config.method,
        "params": params.model_dump(mode="json"),
        "seed": seed,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "samples": {name: sum(s.expert == k for s in samples) for k, name in enumerate(expert_names)},
        "sample_tokens": sum(s.input_ids.numel() for s in samples),
        "hidden_layers": layers,
        "tensors": len(names),
        "chunks": {name: m for name, m in chunks.items()},
        "stages": [{"name": s.name, "trained_per_expert": s.trained_per_expert, "seconds": round(s.seconds, 3),
                    "steps": s.steps} for s in stages],
        "seconds": round(time.perf_counter() - started, 3),
        "task_vectors_mb": round(_nbytes(task_vectors.values()), 2),
        "teacher_cache_mb": round(_nbytes([t.log_probs for t in teachers] + [h for t in teachers for h in t.hidden]),
                                  2),
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }
    return CalibrationResult(coefficients, stages, report)
