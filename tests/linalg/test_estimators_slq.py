"""Hutchinson trace/diagonal and SLQ logdet meet their stated accuracy on fixed seeds."""

from __future__ import annotations

import math

import pytest
import torch

import curvop
from curvop.errors import InputError, InputTypeError
from curvop.linalg import hutchinson_diagonal, hutchinson_trace, slq_logdet

from cases import register

F64 = torch.float64


def _spd(n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n // 2, generator=g, dtype=F64)
    return scale * X @ X.T / n + 0.1 * torch.eye(n, dtype=F64)


def _offdiag_sq(A):
    return (A.pow(2).sum() - A.diagonal().pow(2).sum())


def test_trace_within_stated_error_and_reproducible():
    A = _spd(40)
    m = 64
    est = hutchinson_trace(A, m, seed=0)
    assert est.num_probes == m and est.num_products == m
    assert abs(float(est.value - A.trace())) <= 3 * float(est.stderr)
    theory = math.sqrt(2 * float(_offdiag_sq(A)) / m)
    assert 0.6 * theory <= float(est.stderr) <= 1.5 * theory
    # coverage over seeds: about 95% within two standard errors
    hits = [abs(float(e.value - A.trace())) <= 2 * float(e.stderr)
            for e in (hutchinson_trace(A, 30, seed=s) for s in range(60))]
    assert sum(hits) >= 0.85 * len(hits)
    # reproducible: a seed gives the same probes; a generator is consumed; blocks do not matter
    assert torch.equal(hutchinson_trace(A, 20, seed=5).value,
                       hutchinson_trace(A, 20, seed=5, block=7).value)
    g = torch.Generator().manual_seed(1)
    assert hutchinson_trace(A, 20, generator=g).value != hutchinson_trace(A, 20, generator=g).value
    assert float(hutchinson_trace(torch.diag(torch.arange(5.0, dtype=F64)), 3).stderr) == 0


def test_diagonal_within_stated_error():
    A = _spd(50, seed=2)
    m = 200
    est = hutchinson_diagonal(A, m, seed=3, block=64)
    z = (est.value - A.diagonal()) / est.stderr
    assert float((z.abs() <= 2).double().mean()) >= 0.85 and float(z.abs().max()) < 4.5
    theory = ((A.pow(2).sum(1) - A.diagonal().pow(2)) / m).sqrt()
    ratio = est.stderr / theory
    assert 0.7 <= float(ratio.median()) <= 1.3
    assert est.num_products == m


def test_estimators_through_a_dataset_operator():
    torch.manual_seed(0)
    model = register(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                         torch.nn.Linear(6, 2)).double())
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(16, 4, generator=g, dtype=F64), torch.randint(0, 2, (16,), generator=g)
    op = curvop.TorchGGN(model, "classification").dataset_operator(
        [(X[:8], Y[:8]), (X[8:], Y[8:])])
    H = op.to_dense()
    t = hutchinson_trace(op, 50, seed=0)
    assert abs(float(t.value - H.trace())) <= 3 * float(t.stderr)
    d = hutchinson_diagonal(op, 50, seed=0)
    assert float(((d.value - H.diagonal()).abs() <= 4 * d.stderr + 1e-12).double().mean()) == 1
    e = slq_logdet(op, 0.1, num_probes=20, max_steps=60, quad_tol=1e-10)
    exact = torch.logdet(H + 0.1 * torch.eye(H.shape[0], dtype=F64))
    assert e.converged and abs(float(e.value - exact)) <= 3 * float(e.stderr)
    with pytest.raises(InputError, match="num_probes"):
        hutchinson_trace(op, 0)
    with pytest.raises(InputTypeError, match="num_probes"):
        hutchinson_diagonal(op, 2.5)


def test_slq_logdet_accuracy_coverage_and_grid():
    A = _spd(60, seed=4, scale=50.0)
    delta = 0.05
    exact = torch.logdet(A + delta * torch.eye(60, dtype=F64))
    est = slq_logdet(A, delta, num_probes=30, max_steps=80, quad_tol=1e-10)
    assert est.converged and est.quadrature_change <= 1e-10
    assert abs(float(est.value - exact)) <= 3 * float(est.stderr)
    hits = [abs(float(e.value - exact)) <= 2 * float(e.stderr)
            for e in (slq_logdet(A, delta, num_probes=10, max_steps=80, seed=s)
                      for s in range(40))]
    assert sum(hits) >= 0.8 * len(hits)
    # one Lanczos run serves a grid; each entry equals its own run up to the quadrature tolerance
    grid = slq_logdet(A, [delta, 1.0, 10.0], num_probes=10, max_steps=80, quad_tol=1e-10)
    for d, e in zip([delta, 1.0, 10.0], grid):
        alone = slq_logdet(A, d, num_probes=10, max_steps=80, quad_tol=1e-10)
        assert abs(float(e.value - alone.value)) <= 1e-8 * 60
    # too few steps: reported, not hidden
    short = slq_logdet(A, delta, num_probes=10, max_steps=6, quad_tol=1e-12)
    assert not short.converged and short.steps == 6 and short.quadrature_change > 1e-12
    with pytest.raises(InputError, match="positive definite"):
        slq_logdet(A - 2 * float(torch.linalg.eigvalsh(A)[-1]) * torch.eye(60, dtype=F64), 0.1)
