"""Calibration end to end: samples, the runner (whole model or block by block), stage 1 (and EM++ stage 2),
warm starts from an earlier calibration, the report."""

from __future__ import annotations

import fnmatch
import logging
import resource
import time
from dataclasses import dataclass, field

import torch

from merging.calibration.blockwise import BlockwiseRunner
from merging.calibration.coefficients import Coefficients
from merging.calibration.components import check_warm, is_components, per_component, ranks_of
from merging.calibration.expert_merging import StageReport, inverse_activation, raw_of
from merging.calibration.full_model import FullModelRunner
from merging.calibration.gamma_choice import choose_gamma
from merging.calibration.importance import allocate_chunks, importance
from merging.calibration.init_choice import choose_init
from merging.calibration.params import CalibrationParams
from merging.calibration.samples import load_samples
from merging.config import MergeConfig
from merging.errors import ConfigError
from merging.experts import Expert
from merging.io.checkpoint import CheckpointReader
from merging.io.hf_loading import load_model_config, load_tokenizer

log = logging.getLogger("mergeplan")


@dataclass
class CalibrationResult:
    coefficients: Coefficients
    stages: list[StageReport]
    report: dict = field(default_factory=dict)
    kept: dict[int, Coefficients] = field(default_factory=dict)  # params.keep_epochs: epoch -> coefficients


def calibrated_tensors(base: CheckpointReader, merged_names: set[str], exclude: list[str]) -> list[str]:
    """The tensors that get coefficients, in checkpoint order: merged and not excluded."""
    return [name for name in base.names() if name in merged_names
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)]


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: the process's peak RSS


def learn(runner: FullModelRunner | BlockwiseRunner, method: str, names: list[str], rows: dict[str, int],
          experts: int, params: CalibrationParams, device: torch.device, warm: Coefficients | None = None,
          ) -> tuple[dict[str, torch.Tensor], dict[str, int], list[StageReport]]:
    """Stage 1 (one α per tensor and expert); for EM++ the chunk allocation and stage 2. -> (α, chunks, reports)

    params.coefficients: rank (runner.components: the tensors it reaches): expert_merging trains one α per LoRA
    component there from the start; EM++ trains stage 1 per tensor, and in stage 2 a tensor the allocation gives
    any chunk (m ≥ 1) trains its components instead of m row blocks, each from its tensor's stage-1 α.
    With `warm` (an earlier calibration's coefficients, rows in this merge's expert order, new experts at init):
    stage 1 starts from them (a component from its tensor's α); for EM++ whose warm coefficients have chunks or
    components, only stage 2 runs, on those. The last stage keeps α after each epoch of params.keep_epochs."""
    components = runner.components
    last = frozenset(params.keep_epochs)
    start = torch.full((experts, 1), inverse_activation(params.activation, params.init), device=device)
    if warm is not None and method == "expert_merging_pp" and any(
            is_components(a) or a.shape[1] > 1 for a in warm.alpha.values()):
        chunks = {n: _width(warm.alpha[n]) if warm.trained.get(n, True) else 0 for n in names}
        raw = {n: raw_of(params.activation, warm.alpha[n].to(device)) for n in names if chunks[n]}
        fixed = {n: warm.alpha[n].to(device) for n in names if not chunks[n]}
        second = runner.run("expert_merging_pp", raw, fixed, last)
        return second.alpha, chunks, second.reports

    def widened(name: str, raw: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        """A per-tensor raw r as the start of a finer family: each component (or row block) at its value."""
        if name in components and not is_components(raw):
            return per_component(raw, components[name])
        return raw if chunks == 1 else raw.expand(-1, chunks).contiguous()

    starts = {n: raw_of(params.activation, warm.alpha[n].to(device)) if warm else start for n in names}
    if method != "expert_merging_pp":
        first = runner.run(method if method == "adamerging" else "expert_merging",
                           {n: widened(n, r) for n, r in starts.items()}, {}, last)
        return first.alpha, dict.fromkeys(names, 1), first.reports
    first = runner.run("expert_merging", starts, {}, frozenset())
    chunks = allocate_chunks(importance(first.alpha, runner.task_vector_l1), rows, params.budget, params.kappa)
    from_stage1 = params.stage2_init == "stage1"
    raw = {n: widened(n, first.raw[n] if from_stage1 else start, m) for n, m in chunks.items() if m > 0}
    fixed = {n: first.alpha[n] if from_stage1 else torch.full_like(first.alpha[n], params.init)
             for n, m in chunks.items() if m == 0}
    if not raw:
        log.warning("expert_merging_pp: the budget %.2f gives no tensor a chunk; keeping stage 1's coefficients",
                    params.budget)
        return first.alpha, chunks, first.reports
    second = runner.run("expert_merging_pp", raw, fixed, last)
    return second.alpha, chunks, first.reports + second.reports


def _width(alpha: torch.Tensor) -> int:
    """Chunks of a (K, m) α; 1 for a tensor's components (a refined tensor, as EM++'s allocation counts it)."""
    return 1 if is_components(alpha) else alpha.shape[1]


def family_report(params: CalibrationParams, alpha: dict[str, torch.Tensor], components: dict) -> dict:
    """What calibration.json says of the coefficient family: how many tensors got components, and the counts."""
    refined = [a for a in alpha.values() if is_components(a)]
    return {"family": params.coefficients, "rank_eligible_tensors": len(components),
            "per_component_tensors": len(refined), "components": sum(a.numel() for a in refined),
            "total": sum(a.numel() for a in alpha.values())}


def calibrate(config: MergeConfig, params: CalibrationParams, base: CheckpointReader,
              experts: list[Expert], names: list[str], source: str) -> CalibrationResult:
    """Learn the coefficients of `config.method` for the tensors `names`."""
    started = time.perf_counter()
    if params.coefficients == "rank" and (params.mode == "blockwise" or params.task_vectors == "resident"):
        held = "mode: blockwise" if params.mode == "blockwise" else "task_vectors: resident"
        raise ConfigError(f"{source}: params.coefficients: rank weighs each LoRA component through the adapters' "
                          f"factors, which {held} does not keep; use mode: full with task_vectors: auto (or "
                          "streamed), or coefficients: tensor")
    device = params.torch_device()
    dtype = params.torch_dtype(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed = config.seed if params.seed is None else params.seed
    if not any((config.base / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ConfigError(f"{config.base}: no tokenizer files; calibration tokenises its samples with the base's "
                          "tokenizer: copy tokenizer.json (and tokenizer_config.json) there")
    model_config = load_model_config(config.base)
    layers = params.layer_indices(model_config.num_hidden_layers, source) if params.hidden_weight > 0 else []
    expert_names = [ref.label for ref in config.experts]
    samples = load_samples(config.calibration, expert_names, load_tokenizer(config.base), params.samples_per_expert,
                           model_config.max_position_embeddings, seed, source)
    task_weights = [ref.weight for ref in config.experts]
    if params.mode == "blockwise":
        runner = BlockwiseRunner(base, experts, names, samples, task_weights, params, seed, device, dtype, source)
    else:
        runner = FullModelRunner(config.method, config.base, base, experts, names, samples, layers, task_weights,
                                 params, seed, device, dtype, source)
    unscorable = "mode blockwise has no whole model to score" if isinstance(runner, BlockwiseRunner) else None

    def uniform(value: float, chosen_on: list) -> float:
        return runner.merged_ce({n: torch.full((len(experts), 1), value, device=device) for n in names}, chosen_on)

    params, init_choice = choose_init(params, samples, unscorable, uniform)
    runner.params = params  # ᾱ as chosen
    rows = {name: (base.tensors[name].shape or (1,))[0] for name in names}
    ranks = {name: ranks_of(of, len(experts)) for name, of in runner.components.items()}
    warm, new_experts = None, []
    if params.warm_start is not None:
        earlier = Coefficients.load(params.warm_start)
        check_warm({n: a for n, a in earlier.alpha.items() if n in names}, runner.components, source)
        warm = earlier.warm_start(expert_names, names, params.init, source, ranks)
        new_experts = [name for name in expert_names if name not in earlier.expert_names]

    def train(subset: list, candidate: CalibrationParams) -> dict[str, torch.Tensor]:
        # EM++'s γ is chosen on its first stage (Expert Merging), as the bench chose it, at half the cost; a warm
        # start runs EM++'s second stage alone
        method = "expert_merging" if config.method == "expert_merging_pp" and warm is None else config.method
        with runner.trained_on(subset, candidate):
            return learn(runner, method, names, rows, len(experts), candidate, device, warm)[0]

    params, gamma_choice = choose_gamma(params, samples, unscorable, train,
                                        lambda alpha, held: runner.merged_ce(alpha, held))
    runner.params = params  # γ as chosen
    alpha, chunks, stages = learn(runner, config.method, names, rows, len(experts), params, device, warm)
    trained = {n: chunks[n] > 0 for n in names}
    ranks = {n: counts for n, counts in ranks.items() if is_components(alpha[n])}
    coefficients = Coefficients(config, expert_names, {n: alpha[n].float().cpu() for n in names}, trained, ranks)
    kept = {epoch: Coefficients(config, expert_names, {n: a.float().cpu() for n, a in earlier.items()}, trained,
                                ranks)
            for epoch, earlier in _kept_alpha(stages, alpha, names).items()}
    if isinstance(runner, BlockwiseRunner):
        memory = {"task_vectors_mb": round(runner.peak_task_vectors_mb, 2),
                  "hidden_cache_mb": round(runner.hidden_cache_mb, 2)}
    else:
        memory = runner.report()
    report = {
        "method": config.method,
        "mode": params.mode,
        "warm_start": None if warm is None else {"from": str(params.warm_start),
                                                   "new_experts": new_experts},
        "params": params.model_dump(mode="json"),
        "init_choice": init_choice,
        "gamma_choice": gamma_choice,
        "seed": seed,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "samples": {name: sum(s.expert == k for s in samples) for k, name in enumerate(expert_names)},
        "sample_tokens": sum(s.input_ids.numel() for s in samples),
        "max_sample_tokens": max(s.input_ids.numel() for s in samples),
        "hidden_layers": layers if params.mode == "full" else "every block",
        "tensors": len(names),
        "chunks": chunks,
        "coefficients": family_report(params, alpha, runner.components),
        "stages": [{"name": s.name, "trained_per_expert": s.trained_per_expert, "trained_coefficients": s.trained,
                    "seconds": round(s.seconds, 3), "steps": s.steps} for s in stages],
        "seconds": round(time.perf_counter() - started, 3),
        **memory,
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }
    return CalibrationResult(coefficients, stages, report, kept)


def _kept_alpha(stages: list[StageReport], final: dict[str, torch.Tensor], names: list[str],
                ) -> dict[int, dict[str, torch.Tensor]]:
    """α after each kept epoch of the last stage; tensors it did not train (blocks with nothing trained, in
    blockwise mode) keep their final α, which no epoch changed."""
    last = stages[-1].name.split(" block ")[0]
    kept: dict[int, dict[str, torch.Tensor]] = {}
    for stage in stages:
        if stage.name.split(" block ")[0] == last:
            for epoch, alpha in stage.kept.items():
                kept.setdefault(epoch, {n: final[n] for n in names}).update(alpha)
    return kept
