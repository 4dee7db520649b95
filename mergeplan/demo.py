"""`mergeplan demo`: tiny random Llama models merged with every method, and the incremental check."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from merging import MergeConfig, add_experts, merge
from merging.checkpoint import CheckpointReader
from merging.synthetic import llama_config, write_random_base, write_random_expert

METHODS = {
    "average": {},
    "task_arithmetic": {"lambda": 0.8, "normalize": True},
    "ties": {"density": 0.2},
    "dare_linear": {"density": 0.5},
    "dare_ties": {"density": 0.5},
}
EXPERTS = 4


def task_vector(model: Path, base: CheckpointReader) -> torch.Tensor:
    reader = CheckpointReader(model)
    return torch.cat([(reader.read(n).float() - base.read(n).float()).reshape(-1) for n in base.names()])


def max_difference(a: Path, b: Path) -> float:
    first, second = CheckpointReader(a), CheckpointReader(b)
    return max(float((first.read(n).float() - second.read(n).float()).abs().max()) for n in first.names())


@torch.no_grad()
def next_token_logits(model: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    return loaded(torch.arange(16).unsqueeze(0)).logits[0, -1]


def run_demo(workdir: Path) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    logging.getLogger("mergeplan").setLevel(logging.WARNING)
    if workdir.exists():
        shutil.rmtree(workdir)
    base = write_random_base(workdir / "base", llama_config())
    experts = [write_random_expert(base, workdir / f"expert{i}", seed=i + 1) for i in range(EXPERTS)]
    base_reader = CheckpointReader(base)
    expert_vectors = torch.stack([task_vector(e, base_reader) for e in experts])
    mean_vector = expert_vectors.mean(0)
    print(f"built a base and {EXPERTS} experts ({base_reader.config['num_hidden_layers']} layers, "
          f"{sum(i.numel for i in base_reader.tensors.values()):,} parameters) in {workdir}\n")
    print(f"{'method':<16}{'seconds':>9}{'|task vector|':>15}{'cos to mean':>13}{'logit shift':>13}")
    base_logits = next_token_logits(base)
    for method, params in METHODS.items():
        config = MergeConfig(base=base, experts=experts, method=method, params=params)
        started = time.perf_counter()
        out = merge(config, workdir / f"merged-{method}")
        seconds = time.perf_counter() - started
        merged = task_vector(out, base_reader)
        cosine = float(torch.nn.functional.cosine_similarity(merged, mean_vector, dim=0))
        shift = float((next_token_logits(out) - base_logits).abs().mean())
        print(f"{method:<16}{seconds:>9.3f}{float(merged.norm()):>15.4f}{cosine:>13.3f}{shift:>13.4f}")
    for method in ("task_arithmetic", "ties"):
        head = MergeConfig(base=base, experts=experts[:-1], method=method, params=METHODS[method])
        merge(head, workdir / f"first3-{method}", save_state=workdir / f"state-{method}")
        added = add_experts(workdir / f"state-{method}", [experts[-1]], workdir / f"incremental-{method}")
        gap = max_difference(added, workdir / f"merged-{method}")
        print(f"\nincremental {method}: {EXPERTS - 1} experts + 1 added later vs all {EXPERTS} at once: "
              f"max |difference| = {gap:g}")
    print(f"\nmerged checkpoints (load with AutoModelForCausalLM.from_pretrained): {workdir}/merged-*")
