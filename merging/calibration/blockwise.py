"""Block-by-block calibration, for models whose K task vectors do not fit beside the model.

Transformer block i is calibrated on its own: its inputs are the merged model's hidden states after the
blocks already calibrated, its targets each expert's own hidden states after block i (on that expert's
samples), the loss their MSE (+ the L1 pull). Only block i's weights are in memory (the base's and K task
vectors), plus one expert's block while the teachers advance, plus the cached hidden states of the samples;
nothing else of any model is loaded. The logit loss needs the whole model, so this mode aligns hidden
states only.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch.func import functional_call

from merging.calibration.expert_merging import (
    StageResult,
    Student,
    TrainableCoefficients,
    Weights,
    load_task_vectors,
    merged_weights,
    train_stage,
)
from merging.calibration.params import CalibrationParams
from merging.calibration.samples import Sample
from merging.errors import ConfigError
from merging.experts import Expert
from merging.io.checkpoint import CheckpointReader
from merging.io.hf_loading import causal_lm_skeleton

BLOCK = re.compile(r"\.layers\.(\d+)\.")


class BlockwiseRunner:
    """Runs a calibration stage one block at a time; task_vector_l1 fills in as blocks are read."""

    def __init__(self, base: CheckpointReader, experts: list[Expert], names: list[str],
                 samples: list[Sample], task_weights: list[float], params: CalibrationParams, seed: int,
                 device: torch.device, dtype: torch.dtype, source: str):
        outside = [name for name in names if not BLOCK.search(name)]
        if outside:
            raise ConfigError(f"{source}: params.mode: blockwise calibrates transformer blocks only, but "
                              f"{outside[0]} is outside them; add it to params.exclude")
        if params.hidden_weight <= 0:
            raise ConfigError(f"{source}: params.hidden_weight: blockwise aligns hidden states only; it must be > 0")
        skeleton = causal_lm_skeleton(base.folder)
        self.layers = skeleton.model.layers
        self.rotary = type(skeleton.model.rotary_emb)(config=skeleton.config).to(device)
        embedding = skeleton.get_input_embeddings().weight
        self.embedding_name = next(n for n, p in skeleton.named_parameters() if p is embedding)
        self.base, self.experts, self.names, self.samples = base, experts, names, samples
        self.task_weights, self.params, self.seed, self.device, self.dtype = task_weights, params, seed, device, dtype
        self.task_vector_l1: dict[str, torch.Tensor] = {}
        self.components: dict[str, torch.Tensor] = {}  # per-component coefficients need factors: never here
        self.peak_task_vectors_mb = 0.0
        self.hidden_cache_mb = 0.0

    def _read(self, name: str, expert: Expert | None) -> torch.Tensor:
        """The base's tensor, or the expert's own value of it."""
        tensor = self.base.read(name) if expert is None else expert.weights(name, self.base)
        return tensor.to(self.device, self.dtype)

    def _embed(self, samples: list[Sample], expert: Expert | None = None) -> list[torch.Tensor]:
        table = self._read(self.embedding_name, expert)
        return [F.embedding(sample.input_ids.to(self.device), table) for sample in samples]

    def block_forward(self, index: int, weights: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        """Block `index` with `weights` (checkpoint names) on hidden states (1, length, hidden); causal."""
        prefix = f"model.layers.{index}."
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = self.rotary(hidden, position_ids=positions)
        local = {name.removeprefix(prefix): tensor for name, tensor in weights.items()}
        return functional_call(self.layers[index], local, args=(hidden,),
                               kwargs={"attention_mask": None, "position_ids": positions,
                                       "position_embeddings": rotary})

    def _read_block(self, index: int, expert: Expert | None = None) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{index}."
        return {n: self._read(n, expert) for n in self.base.names() if n.startswith(prefix)}

    @torch.no_grad()
    def _advance_teachers(self, index: int, teacher_states: list[torch.Tensor]) -> None:
        for k, expert in enumerate(self.experts):
            own = [j for j, sample in enumerate(self.samples) if sample.expert == k]
            if own:
                weights = self._read_block(index, expert)
                for j in own:
                    teacher_states[j] = self.block_forward(index, weights, teacher_states[j])

    def run(self, name: str, raw: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
            keep_epochs: frozenset[int] = frozenset()) -> StageResult:
        student_states = self._embed(self.samples)
        teacher_states = list(student_states)
        for k, expert in enumerate(self.experts):
            own = [j for j, sample in enumerate(self.samples) if sample.expert == k]
            for j, state in zip(own, self._embed([self.samples[j] for j in own], expert), strict=True):
                teacher_states[j] = state
        self.hidden_cache_mb = 2 * sum(h.numel() * h.element_size() for h in student_states) / 2**20
        result = StageResult({}, {}, [])
        for index in range(len(self.layers)):
            self._advance_teachers(index, teacher_states)
            student_states = self._calibrate_block(name, index, raw, fixed, student_states, teacher_states, result,
                                                   keep_epochs)
        return result

    def _calibrate_block(self, name: str, index: int, raw: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
                         student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                         result: StageResult, keep_epochs: frozenset[int]) -> list[torch.Tensor]:
        """Learn block `index`'s coefficients into `result`; returns the student's states after the block."""
        base_weights = self._read_block(index)
        calibrated = [n for n in base_weights if n in raw or n in fixed]
        task_vectors = load_task_vectors(self.base, self.experts, calibrated, self.device, self.dtype)
        self.peak_task_vectors_mb = max(self.peak_task_vectors_mb, sum(
            t.numel() * t.element_size() for t in task_vectors.values()) / 2**20)
        for tensor, vectors in task_vectors.items():
            self.task_vector_l1.setdefault(tensor, vectors.abs().sum(dim=1, dtype=torch.float32))
        index_of = {id(sample): j for j, sample in enumerate(self.samples)}

        def losses(merged: Weights, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
            j = index_of[id(sample)]
            mse = F.mse_loss(self.block_forward(index, base_weights | merged, student_states[j]).float(),
                             teacher_states[j].float())
            return torch.zeros((), device=mse.device), mse

        coefficients = TrainableCoefficients({n: raw[n] for n in calibrated if n in raw},
                                             {n: fixed[n] for n in calibrated if n in fixed}, self.params.activation)
        if coefficients.trained:
            student = Student(lambda alpha: merged_weights(base_weights, task_vectors, alpha), losses)
            result.reports.append(train_stage(f"{name} block {index}", coefficients, self.samples, student,
                                              self.task_weights, self.params, self.seed, keep_epochs))
            result.raw |= {n: coefficients.raw_value(n) for n in coefficients.trained}
        alpha = {n: a.detach() for n, a in coefficients.alpha().items()}
        result.alpha |= alpha
        with torch.no_grad():
            final = base_weights | merged_weights(base_weights, task_vectors, alpha)
            return [self.block_forward(index, final, h) for h in student_states]
