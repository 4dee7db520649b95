"""The training loop of the zoo: AdamW, linear warm-up then cosine decay, gradient clipping. One screen."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from merging.data.loading import Encoded, collate
from merging.errors import TrainingError
from merging.progress_bar import progress_bar

log = logging.getLogger("mergeplan")
PROGRESS_SECONDS = 60


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    all_tokens: bool = False  # pretraining counts prompts too; fine-tuning counts responses only


def batches(examples: list[Encoded], batch_size: int, seed: int) -> Iterator[list[Encoded]]:
    """Endless shuffled epochs over the examples, seeded."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[i] for i in order[start : start + batch_size]]


def learning_rate(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(model: torch.nn.Module, examples: list[Encoded], settings: TrainSettings, pad_id: int,
          seed: int, label: str = "training", device: torch.device | str = "cpu") -> list[float]:
    """Train `model`'s trainable parameters in place (on `device`, where the model is); returns the loss of every
    step. Reports progress once a minute."""
    torch.manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95))
    stream = batches(examples, settings.batch_size, seed)
    losses = []
    last_report = time.perf_counter()
    model.train()
    for step in progress_bar(range(settings.steps), label, "step"):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        batch = {key: value.to(device) for key, value in collate(next(stream), pad_id, settings.all_tokens).items()}
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise TrainingError(f"{label}: loss is {loss.item()} at step {step + 1}; lower the learning rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if time.perf_counter() - last_report > PROGRESS_SECONDS:
            log.info("%s: step %d/%d, loss %.3f", label, step + 1, settings.steps, losses[-1])
            last_report = time.perf_counter()
    model.eval()
    return losses
