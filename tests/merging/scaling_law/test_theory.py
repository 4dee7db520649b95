"""The scaling law's second-order theory: exact on a quadratic loss, and measured on a zoo as the sweep measures."""

import itertools

import numpy as np
import pytest
import torch

from merging.errors import ConfigError
from merging.scaling_law.theory import QuadraticTerms, check_theory, quadratic_terms
from merging.sweep.run import SweepSettings, run_sweep
from merging.sweep.table import read_table
from merging.zoo.layout import zoo_families

POOL, DIM = 5, 7


def quadratic_loss(seed: int):
    """L(x) = c + gᵀx + ½xᵀHx, with H symmetric positive definite."""
    generator = torch.Generator().manual_seed(seed)
    g = torch.randn(DIM, generator=generator, dtype=torch.float64)
    root = torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)
    h = root @ root.T + torch.eye(DIM, dtype=torch.float64)

    def loss(x: torch.Tensor) -> float:
        return float(0.7 + g @ x + 0.5 * x @ h @ x)

    return loss, g, h


def test_terms_of_a_quadratic_loss_are_exact_and_predict_every_subset_mean():
    loss, g, h = quadratic_loss(seed=0)
    generator = torch.Generator().manual_seed(1)
    vectors = [torch.randn(DIM, generator=generator, dtype=torch.float64) for _ in range(POOL)]
    # the vectors split into two tensors, as a checkpoint's are
    terms = quadratic_terms(lambda offset: loss(torch.cat(offset)), [[v[:3], v[3:]] for v in vectors], step=0.5)

    mean = torch.stack(vectors).mean(0)
    covariance = sum(torch.outer(v - mean, v - mean) for v in vectors) / POOL
    assert terms.base_loss == pytest.approx(0.7, abs=1e-12)
    assert terms.gradient_term == pytest.approx(float(g @ mean), rel=1e-9)
    assert terms.curvature_term == pytest.approx(float(0.5 * mean @ h @ mean), rel=1e-9)
    assert terms.trace_term == pytest.approx(float(0.5 * torch.trace(h @ covariance)), rel=1e-9)
    for k in range(1, POOL + 1):
        measured = np.mean([loss(torch.stack([vectors[i] for i in subset]).mean(0))
                            for subset in itertools.combinations(range(POOL), k)])
        assert terms.expected_loss(k) == pytest.approx(measured, rel=1e-9), k
    # the law's form: A/k over the floor, and the floor is the quadratic at μ less A/M
    assert terms.expected_loss(POOL) == pytest.approx(loss(mean), rel=1e-9)
    assert terms.amplitude == pytest.approx(terms.trace_term * POOL / (POOL - 1))


def test_terms_need_a_pool():
    with pytest.raises(ConfigError, match="at least 2 task vectors"):
        quadratic_terms(lambda offset: 0.0, [[torch.zeros(2)]])


def test_floor_and_amplitude_from_terms():
    terms = QuadraticTerms(pool_size=9, base_loss=1.0, gradient_term=-0.2, curvature_term=0.05, trace_term=0.08)
    assert terms.amplitude == pytest.approx(0.09)
    assert terms.floor == pytest.approx(1.0 - 0.2 + 0.05 - 0.01)
    assert terms.to_dict()["floor"] == pytest.approx(terms.floor)


def test_check_theory_measures_what_the_sweep_measures(tiny_zoo, tmp_path):
    """L(θ0) is the base's macro CE and L(θ0 + μ) the sweep's average of all nine, on the same examples."""
    settings = SweepSettings(methods=("average",), design="all", ks=(9,), eval_examples=2)
    run_sweep(zoo_families(tiny_zoo), tiny_zoo / "data", tmp_path / "full.parquet", settings)
    table = read_table(tmp_path / "full.parquet")
    family = zoo_families(tiny_zoo)[0]
    check = check_theory(family, tiny_zoo / "data", eval_examples=2)
    assert check.merged_all_loss == pytest.approx(float(np.mean(table["ce"])), rel=1e-5)
    # the quadratic around the base reaches the merge of all nine from the base's side
    assert abs(check.quadratic_all_loss - check.merged_all_loss) < abs(check.terms.base_loss - check.merged_all_loss)
    assert check.terms.trace_term > 0
