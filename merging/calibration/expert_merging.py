"""Expert Merging (arXiv 2509.25712): learn α per (tensor, chunk, expert) by aligning the merged model with
each expert on a few unlabeled samples of its domain. AdaMerging (arXiv 2310.02575) trains the same
coefficients with another loss: the entropy of the merged model's own predictions.

θ = θ0 + Σk α_k · τk, α = sigmoid(r) (or clamp(r, 0, 1)). Only r is trained: the student is the frozen base whose
calibrated tensors are merged per optimizer step (dense task vectors, through torch.func.functional_call) or by
the layers themselves (factors, streamed vectors: calibration/factored.py), so autograd reaches the coefficients
and nothing else. Where the task vectors and the teachers come from: calibration/sources.py, teachers.py.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

from merging.calibration.factored import GatedMLP, MergedLinear, is_gated_silu_mlp
from merging.calibration.params import CalibrationParams
from merging.calibration.samples import Sample, balanced_order
from merging.calibration.sources import TensorSources
from merging.calibration.teachers import TeacherOutput, logit_kl
from merging.errors import TrainingError
from merging.experts import Expert
from merging.io.checkpoint import CheckpointReader
from merging.methods.learned import combine, row_length
from merging.progress_bar import progress_bar

log = logging.getLogger("mergeplan")
PROGRESS_SECONDS = 30
Weights = dict[str, torch.Tensor]
ALPHA = "alpha:"  # prefix of the entries of a Weights dict that carry a layer's coefficients, not a weight


@dataclass
class StageReport:
    name: str
    trained_per_expert: int  # L of the pull: a tensor's per-component coefficients count as one
    steps: list[dict] = field(default_factory=list)  # one row per optimizer step
    seconds: float = 0.0
    kept: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # epoch -> α after it
    trained: int = 0  # every trained coefficient


@dataclass
class StageResult:
    alpha: dict[str, torch.Tensor]  # every tensor's coefficients, detached
    raw: dict[str, torch.Tensor]  # the trained tensors' raw r, detached (stage 2 may start from them)
    reports: list[StageReport]


def load_task_vectors(base: CheckpointReader, experts: list[Expert], names: list[str],
                      device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """(K, numel) per tensor, computed in float32 then stored once in the compute dtype on the device."""
    vectors = {}
    for name in names:
        base_tensor = base.read(name).float()
        stacked = torch.zeros((len(experts), base_tensor.numel()), dtype=dtype, device=device)
        for k, expert in enumerate(experts):
            vector = expert.read_task_vector(name, base_tensor)
            if vector is not None:
                stacked[k].copy_(vector.view(-1))
        vectors[name] = stacked
    return vectors


def merged_weights(base: dict[str, torch.Tensor], task_vectors: dict[str, torch.Tensor],
                   alpha: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ0 + combine(τ, α) for every tensor that has task vectors."""
    return {name: base[name] + combine(vectors, alpha[name], row_length(base[name].shape)).view_as(base[name])
            for name, vectors in task_vectors.items()}


class MergedModel:
    """The base model run as the student, θ0 + combine(τ, α) per calibrated tensor: a tensor's dense task vectors
    through a merged weight given to functional_call, its factors or streamed vectors by a MergedLinear layer
    that reads α (passed in the same dict under ALPHA + name)."""

    def __init__(self, model: torch.nn.Module, sources: dict[str, TensorSources], experts: int):
        self.model, self.sources, self.experts = model, sources, experts
        self.base = dict(model.named_parameters())
        self.layers: dict[str, MergedLinear] = {}
        for name, module in list(model.named_modules()):
            if is_gated_silu_mlp(module, getattr(model.config, "hidden_act", None)):
                model.set_submodule(name, GatedMLP(module))
        for name, source in sources.items():
            if source.via_module:
                module = name.rpartition(".")[0]
                self.layers[name] = MergedLinear(model.get_submodule(module), source)
                model.set_submodule(module, self.layers[name])

    def merged(self, alpha: dict[str, torch.Tensor]) -> Weights:
        weights = {}
        for name, source in self.sources.items():
            if source.dense is not None:
                chosen = source.dense.experts
                own = alpha[name] if chosen == list(range(self.experts)) else alpha[name][chosen]
                weights[name] = self.base[name] + combine(source.dense.vectors, own, row_length(source.shape)
                                                          ).view(source.shape)
            if source.via_module:
                weights[ALPHA + name] = alpha[name]
        return weights

    def one_hot(self, expert: int) -> Weights:
        """The merged weights of expert `expert` alone: α = 1 for it, 0 for the others."""
        alpha = torch.zeros(self.experts, 1, device=next(iter(self.base.values())).device)
        alpha[expert] = 1.0
        return self.merged(dict.fromkeys(self.sources, alpha))

    def __call__(self, weights: Weights, input_ids: torch.Tensor, hidden: bool):
        for name, layer in self.layers.items():
            layer.alpha = weights[ALPHA + name]
        try:
            return functional_call(self.model, {n: w for n, w in weights.items() if not n.startswith(ALPHA)},
                                   args=(), kwargs={"input_ids": input_ids, "output_hidden_states": hidden,
                                                    "use_cache": False})
        finally:
            for layer in self.layers.values():
                layer.alpha = None


def alignment_losses(out, teacher: TeacherOutput, layers: list[int], temperature: float) -> tuple[torch.Tensor, ...]:
    """(T² · KL(teacher ‖ student) per position, hidden-state MSE averaged over layers)."""
    logits = out.logits[0].float()
    logits = logits / temperature if temperature != 1 else logits
    logit = temperature**2 * logit_kl(logits, teacher) / logits.shape[0]
    if not layers:
        return logit, torch.zeros((), device=logit.device)
    pairs = zip(layers, teacher.hidden, strict=True)
    hidden = sum(F.mse_loss(out.hidden_states[i][0].float(), target.float()) for i, target in pairs)
    return logit, hidden / len(layers)


class TrainableCoefficients(torch.nn.Module):
    """Raw r (trained) and fixed α per tensor; alpha() maps the trained r through the activation.

    sigmoid (Expert Merging): α = sigmoid(r), in (0, 1). clamp (AdaMerging): α = clamp(r, 0, 1).
    """

    def __init__(self, raw: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor], activation: str = "sigmoid",
                 pull: dict[str, torch.Tensor] | None = None):
        """pull[name]: (R,) each component's weight in the L1 pull, for the tensors whose raw r is per component
        (1-D): components.pull_weights."""
        super().__init__()
        self.names = list(raw) + list(fixed)
        self.raw = torch.nn.ParameterDict({_key(n): torch.nn.Parameter(r.clone()) for n, r in raw.items()})
        self.trained = list(raw)
        self.fixed = fixed
        self.activation = ACTIVATIONS[activation]
        self.pull = {n: pull[n] for n in raw if raw[n].dim() == 1} if pull else {}

    def alpha(self) -> dict[str, torch.Tensor]:
        return {name: self.activation(self.raw[_key(name)]) for name in self.trained} | self.fixed

    def raw_value(self, name: str) -> torch.Tensor:
        return self.raw[_key(name)].detach()

    def per_expert(self) -> int:
        """L: trained coefficients per expert as the pull counts them (a tensor's components count as one)."""
        return sum(1 if name in self.pull else self.raw[_key(name)].shape[1] for name in self.trained)

    def regulariser(self, alpha: dict[str, torch.Tensor], init: float) -> torch.Tensor:
        """Σk Σℓ |α − ᾱ| / L over the trained tensors, L = trained coefficients per expert (the released code's
        scaling); an expert's components on a tensor count as one coefficient: their mean |α − ᾱ|."""
        return sum(((alpha[name] - init).abs() * self.pull[name]).sum() if name in self.pull
                   else (alpha[name] - init).abs().sum() for name in self.trained) / self.per_expert()


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid, "clamp": lambda raw: raw.clamp(0.0, 1.0)}


def inverse_activation(activation: str, alpha: float) -> float:
    """The raw r whose α is `alpha`."""
    return math.log(alpha / (1 - alpha)) if activation == "sigmoid" else alpha


def raw_of(activation: str, alpha: torch.Tensor) -> torch.Tensor:
    """The raw r whose α is `alpha` (a tensor): the inverse of the activation, kept finite."""
    return torch.logit(alpha.float().clamp(1e-6, 1 - 1e-6)) if activation == "sigmoid" else alpha.float().clone()


def _key(name: str) -> str:
    return name.replace(".", "/")  # ParameterDict keys may not contain dots



@dataclass
class Student:
    """What a stage trains. merged(α) gives the α-dependent weights (checkpoint names); losses(weights, sample)
    gives (output loss, hidden-state loss) of the student built from those weights on one sample."""

    merged: Callable[[dict[str, torch.Tensor]], Weights]
    losses: Callable[[Weights, Sample], tuple[torch.Tensor, torch.Tensor]]


def full_model_student(model: MergedModel, teacher: Callable[[Sample], TeacherOutput] | None, layers: list[int],
                       temperature: float) -> Student:
    """The whole merged model. With teachers: (T²·KL to the sample's teacher, hidden MSE) — Expert Merging.
    Without: (mean entropy of the next-token distributions, 0) — AdaMerging's unsupervised objective."""
    device = next(iter(model.base.values())).device

    def losses(weights: Weights, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        target = None if teacher is None else teacher(sample)  # first: a recomputed teacher resets the layers' α
        out = model(weights, sample.input_ids.to(device), hidden=bool(layers))
        if target is None:
            return prediction_entropy(out.logits[0]), torch.zeros((), device=device)
        return alignment_losses(out, target, layers, temperature)

    return Student(model.merged, losses)


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the next-token distributions, logits (length, vocab)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


def train_stage(name: str, coefficients: TrainableCoefficients, samples: list[Sample], student: Student,
                task_weights: list[float], params: CalibrationParams, seed: int,
                keep_epochs: frozenset[int] = frozenset()) -> StageReport:
    """AdamW on r with cosine warm restarts, gradient clipping and accumulation; one row per optimizer step.

    The merged weights are built once per optimizer step, not once per sample: each sample's backward stops at
    detached copies of them, and their summed gradients go through the merge once (the same gradient, a
    K-fold merge cost saved per sample). α after each epoch in `keep_epochs` is kept in the report.
    """
    report = StageReport(name, coefficients.per_expert(), trained=sum(p.numel() for p in coefficients.raw.values()))
    trainable = list(coefficients.raw.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=params.restart_period, T_mult=params.restart_growth, eta_min=params.min_lr_ratio * params.lr)
    start = last_report = time.perf_counter()
    step = 0
    for epoch in progress_bar(range(params.epochs), name, "epoch"):
        order = balanced_order(samples, seed, epoch)
        for first in range(0, len(order), params.grad_accumulation):
            group = order[first : first + params.grad_accumulation]
            alpha = coefficients.alpha()
            merged = student.merged(alpha)
            detached = {n: w.detach().requires_grad_(w.requires_grad) for n, w in merged.items()}
            regulariser = coefficients.regulariser(alpha, params.init)
            totals = dict.fromkeys(("loss", "logit", "hidden", "regulariser"), 0.0)
            for sample in group:
                output_loss, hidden_loss = student.losses(detached, sample)
                aligned = task_weights[sample.expert] * (output_loss + params.hidden_weight * hidden_loss)
                loss = aligned + params.gamma * regulariser.detach()
                if not torch.isfinite(loss):
                    raise TrainingError(f"{name}: loss is {loss.item()} at optimizer step {step + 1} (epoch "
                                        f"{epoch + 1}); nothing was written. Lower params.lr or check the "
                                        "experts for huge task vectors")
                (aligned / len(group)).backward()
                for key, value in zip(totals, (loss, output_loss, hidden_loss, regulariser), strict=True):
                    totals[key] += value.item() / len(group)
            reached = [n for n in merged if detached[n].grad is not None]
            torch.autograd.backward([params.gamma * regulariser] + [merged[n] for n in reached],
                                    [None] + [detached[n].grad for n in reached])
            gradient_norm = torch.nn.utils.clip_grad_norm_(trainable, params.grad_clip or math.inf)
            report.steps.append({"step": step + 1, "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                                 "grad_norm": float(gradient_norm), **totals})
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if time.perf_counter() - last_report > PROGRESS_SECONDS:
                log.info("%s: step %d, loss %.4f", name, step, totals["loss"])
                last_report = time.perf_counter()
        if epoch + 1 in keep_epochs:
            report.kept[epoch + 1] = {n: a.detach().clone() for n, a in coefficients.alpha().items()}
    report.seconds = time.perf_counter() - start
    first_loss, last_loss = report.steps[0]["loss"], report.steps[-1]["loss"]
    log.info("%s: %d steps in %.1f s, loss %.4f -> %.4f", name, step, report.seconds, first_loss, last_loss)
    return report


