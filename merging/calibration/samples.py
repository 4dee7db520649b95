"""Calibration samples: a few unlabeled texts per expert, tokenised whole, and the balanced sampler."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.data.loading import encode, load_examples
from merging.errors import ConfigError
from merging.seeding import python_rng

log = logging.getLogger("mergeplan")


@dataclass(frozen=True)
class Sample:
    expert: int  # index of the expert whose model is this sample's teacher
    input_ids: torch.Tensor  # (1, length)


def load_samples(calibration: dict[str, Path], expert_names: list[str], tokenizer, samples_per_expert: int,
                 max_length: int, seed: int, source: str) -> list[Sample]:
    """`samples_per_expert` texts drawn (seeded) from each expert's calibration data, all tokens kept."""
    unknown = [name for name in calibration if name not in expert_names]
    if unknown:
        raise ConfigError(f"{source}: calibration.{unknown[0]}: no expert is named {unknown[0]!r} (experts: "
                          f"{', '.join(expert_names)}); an expert's name is its folder name or its name: field")
    without = [name for name in expert_names if name not in calibration]
    if len(without) == len(expert_names):
        raise ConfigError(f"{source}: calibration: no expert has calibration data; map expert names to "
                          "data files, e.g. calibration: {algebra: data/algebra/calib.jsonl}")
    if without:
        log.warning("no calibration data for %s: their teachers are never used, their coefficients follow "
                    "only the other experts' samples and the pull to init", ", ".join(without))
    samples, truncated = [], 0
    for index, name in enumerate(expert_names):
        if name not in calibration:
            continue
        examples = load_examples(calibration[name])
        if len(examples) < samples_per_expert:
            log.warning("calibration.%s: %d samples, fewer than samples_per_expert=%d; using all",
                        name, len(examples), samples_per_expert)
        chosen = python_rng(seed, "calibration", name).sample(examples, min(samples_per_expert, len(examples)))
        for example in chosen:
            encoded = encode(tokenizer, example, max_length + 1)
            truncated += len(encoded.ids) > max_length
            samples.append(Sample(index, torch.tensor([encoded.ids[:max_length]])))
    if truncated:
        log.warning("%d calibration samples were longer than the model's context (%d tokens) and were truncated",
                    truncated, max_length)
    return samples


def balanced_order(samples: list[Sample], seed: int, epoch: int) -> list[Sample]:
    """Round-robin over experts (each group shuffled, seeded), up to the largest group; smaller ones cycle."""
    groups: dict[int, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.expert, []).append(sample)
    for expert, group in groups.items():
        python_rng(seed, "order", epoch, expert).shuffle(group)
    rounds = max(len(group) for group in groups.values())
    return [groups[expert][step % len(groups[expert])] for step in range(rounds) for expert in sorted(groups)]
