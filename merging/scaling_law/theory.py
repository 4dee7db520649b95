"""The scaling law's second-order theory (spec: scaling_law.md, "Theory"), measured on a zoo size.

For the equal-weight average of a subset S of k task vectors drawn without replacement from a pool of M,
θ_S = θ0 + mean_{i∈S} τ_i. Expanding the eval loss to second order around the base θ0, with g and H its
gradient and Hessian there, μ the pool's mean task vector and Σ its covariance (normalised by M):

    E_S[L(θ_S)] ≈ L(θ0) + gᵀμ + ½ μᵀHμ + ½ Tr(HΣ) · M/(M − 1) · (1/k − 1/M)

(the finite-pool factor is the variance of a mean drawn without replacement). In the law's form
L(k) = L∞ + A/k (b = 0 at leading order):

    A  = ½ Tr(HΣ) · M/(M − 1)          L∞ = L(θ0) + gᵀμ + ½ μᵀHμ − A/M

Every term is measured on the loss the sweep measures (the macro response CE: the mean over domains of each
domain's token-weighted CE), in float64, by central differences along μ and along each dᵢ = τᵢ − μ
(Tr(HΣ) = (1/M) Σᵢ dᵢᵀHdᵢ): 2M + 3 evaluations, no second derivatives through the model. The checks that
matter are A and L∞ against the fitted ones, and the quadratic's L(θ0 + μ) against the measured merge of all M.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from merging.data.loading import data_domains, load_split
from merging.errors import ConfigError
from merging.evaluate import cross_entropy, load_for_evaluation
from merging.sweep.task_vectors import TaskVectors, model_targets
from merging.zoo.layout import SizeFamily

STEP = 1e-2  # of the central differences, as a fraction of each direction


@dataclass(frozen=True)
class QuadraticTerms:
    """The base's loss and the second-order terms of the pool's task vectors (nats)."""

    pool_size: int
    base_loss: float        # L(θ0)
    gradient_term: float    # gᵀμ
    curvature_term: float   # ½ μᵀHμ
    trace_term: float       # ½ Tr(HΣ)

    @property
    def amplitude(self) -> float:
        """A of L(k) = L∞ + A/k."""
        return self.trace_term * self.pool_size / (self.pool_size - 1)

    @property
    def floor(self) -> float:
        """L∞ of L(k) = L∞ + A/k: the quadratic at the mean minus the finite pool's A/M."""
        return self.base_loss + self.gradient_term + self.curvature_term - self.amplitude / self.pool_size

    def expected_loss(self, k: int) -> float:
        """E over subsets of size k of the second-order loss."""
        return self.floor + self.amplitude / k

    def to_dict(self) -> dict[str, float]:
        return asdict(self) | {"amplitude": self.amplitude, "floor": self.floor}


def quadratic_terms(loss_at: Callable[[list[torch.Tensor]], float], vectors: list[list[torch.Tensor]],
                    step: float = STEP) -> QuadraticTerms:
    """The terms of the loss `loss_at(offset)` (the loss at θ0 + offset) for the task vectors (each a list of
    tensors in one fixed order), by central differences along μ and along each τᵢ − μ.

    The error is O(step²) relative (the third derivative along the direction); the loss should be computed in
    float64, where the rounding error of the second difference is negligible at step 1e-2."""
    if len(vectors) < 2:
        raise ConfigError(f"the theory needs a pool of at least 2 task vectors, got {len(vectors)}")
    mean = [torch.stack(tensors).mean(0) for tensors in zip(*vectors, strict=True)]
    directions = [mean, *[[t - m for t, m in zip(vector, mean, strict=True)] for vector in vectors]]
    base_loss = loss_at([torch.zeros_like(m) for m in mean])
    slopes, curvatures = [], []
    for direction in directions:
        ahead = loss_at([step * v for v in direction])
        behind = loss_at([-step * v for v in direction])
        slopes.append((ahead - behind) / (2 * step))
        curvatures.append((ahead - 2 * base_loss + behind) / step**2)
    return QuadraticTerms(pool_size=len(vectors), base_loss=base_loss, gradient_term=slopes[0],
                          curvature_term=0.5 * curvatures[0], trace_term=0.5 * sum(curvatures[1:]) / len(vectors))


@dataclass(frozen=True)
class TheoryCheck:
    terms: QuadraticTerms
    merged_all_loss: float  # measured L(θ0 + μ): the average of the whole pool
    eval_examples: int

    @property
    def quadratic_all_loss(self) -> float:
        return self.terms.base_loss + self.terms.gradient_term + self.terms.curvature_term

    def to_dict(self) -> dict:
        return {"terms": self.terms.to_dict(), "merged_all_loss": self.merged_all_loss,
                "quadratic_all_loss": self.quadratic_all_loss, "eval_examples": self.eval_examples}


def check_theory(family: SizeFamily, data: Path, eval_examples: int, batch_size: int = 16,
                 step: float = STEP) -> TheoryCheck:
    """The theory's terms for the average merge of one zoo size on the sweep's eval examples (float64), and the
    measured loss of the average of all its experts (the point the quadratic should reach at k = M)."""
    model, tokenizer = load_for_evaluation(family.base, dtype=torch.float64)
    vectors = TaskVectors(family)
    names = sorted({name for vector in vectors.vectors for name in vector})
    targets = model_targets(model, names, family.base)
    base = {name: vectors.base[name].double() for name in names}
    examples = {domain: load_split(data, domain, "eval")[:eval_examples] for domain in data_domains(data)}

    def loss_at(offset: list[torch.Tensor]) -> float:
        with torch.no_grad():
            for name, delta in zip(names, offset, strict=True):
                targets[name].copy_(base[name] + delta)
        losses = [cross_entropy(model, tokenizer, chosen, batch_size, model.config.max_position_embeddings)[0]
                  for chosen in examples.values()]
        return sum(losses) / len(losses)

    pool = [[vector[name].double() if name in vector else torch.zeros_like(base[name]) for name in names]
            for vector in vectors.vectors]
    terms = quadratic_terms(loss_at, pool, step)
    mean = [torch.stack(tensors).mean(0) for tensors in zip(*pool, strict=True)]
    return TheoryCheck(terms, loss_at(mean), eval_examples)
