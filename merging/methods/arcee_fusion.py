"""arcee_fusion: keep the expert's entries whose change is an outlier of importance, as mergekit's arcee_fusion.

With the base θ0 and the one expert θ1, each entry's importance is its change times the KL divergence of its row:
    I = |θ1 − θ0| · Σ_row p·log(p / q),   p = softmax(θ1) + 1e-8,  q = softmax(θ0) + 1e-8
(softmax and the sum along the last dim; a vector is one row). From the quartiles of I, each the entry of the
sorted I at index ⌊q·(n − 1)⌋ (q computed in float32), the threshold is median + 1.5·(Q3 − Q1), and
    merged = θ0 + (θ1 − θ0)·[I ≥ threshold].

Tensors above 1,000,000 entries take the quartiles of 1,000,000 entries drawn with replacement. mergekit draws them
from torch's global generator, which nothing here can reproduce, so on those tensors the threshold (and a few
entries near it) can differ from mergekit's; we draw from merging.seeding.generator(seed, tensor name, 0).
"""

import torch
import torch.nn.functional as F

from merging.methods.group import GroupMethod
from merging.seeding import generator

SOFTMAX_EPS = 1e-8
SAMPLE_SIZE = 1_000_000
QUARTILES = (0.25, 0.5, 0.75)


def importance(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p = F.softmax(expert, dim=-1) + SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + SOFTMAX_EPS
    return (expert - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def quartiles(values: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    flat = values.reshape(-1)
    if flat.numel() > SAMPLE_SIZE:
        flat = flat[torch.randint(flat.numel(), (SAMPLE_SIZE,), generator=rng)]
    ordered = torch.sort(flat).values
    return ordered[(torch.tensor(QUARTILES, device=ordered.device) * (ordered.numel() - 1)).long()]


class ArceeFusion(GroupMethod):
    name = "arcee_fusion"
    takes_weights = False
    max_experts = 1

    def merge(self, base: torch.Tensor, experts: list[torch.Tensor], weights: list[float],
              tensor_name: str) -> torch.Tensor:
        expert = experts[0]
        scores = importance(expert, base)
        q1, median, q3 = quartiles(scores, generator(self.seed, tensor_name, 0))
        mask = (scores >= median + 1.5 * (q3 - q1)).float()
        return base + (expert - base) * mask
