"""CG / MINRES: the tolerance is a checked true residual; preconditioners save products."""

from __future__ import annotations

import linear_operator
import pytest
import torch

import curvop
from curvop.errors import InputError, InputTypeError
from curvop.linalg import (
    DiagonalPreconditioner,
    cg,
    diagonal_preconditioner,
    kron_preconditioner,
    minres,
    nystrom_preconditioner,
)

from cases import register

F64 = torch.float64


def _spd(n, cond=1e4, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return Q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)), n,
                                         dtype=F64)) @ Q.T


def _rel_res(A, x, b):
    return (b - A @ x).norm(dim=0) / b.norm(dim=0)


@pytest.mark.parametrize("solver", [cg, minres])
def test_true_residual_meets_rtol(solver):
    A = _spd(60)
    B = torch.randn(60, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    B[:, 2] = 0  # a zero column is solved by x = 0 and does not stall the others
    for rtol in (1e-4, 1e-8, 1e-12):
        res = solver(A, B, rtol=rtol)
        assert res.converged and res.x.shape == B.shape
        assert bool((_rel_res(A, res.x[:, :2], B[:, :2]) <= rtol).all())
        assert bool((res.x[:, 2] == 0).all())
        assert res.num_products >= res.iterations
    # linear_operator's own CG under its default settings is far looser
    with linear_operator.settings.max_cholesky_size(0):
        x_lo = linear_operator.to_linear_operator(A).solve(B[:, :1])
    assert float(_rel_res(A, x_lo, B[:, :1])) > 1e-6


def test_minres_indefinite_and_shift():
    g = torch.Generator().manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=F64))
    lam = torch.cat([-torch.logspace(0, 2, 15, dtype=F64), torch.logspace(-1, 3, 25, dtype=F64)])
    A = Q @ torch.diag(lam) @ Q.T
    b = torch.randn(40, dtype=F64, generator=g)
    res = minres(A, b, delta=0.05, rtol=1e-10, max_iter=400)
    x_ref = torch.linalg.solve(A + 0.05 * torch.eye(40, dtype=F64), b)
    assert res.converged
    torch.testing.assert_close(res.x, x_ref, rtol=1e-7, atol=1e-9)
    with pytest.raises(InputError, match="not positive definite"):
        cg(A, b, rtol=1e-10, max_iter=400)


def test_failure_is_reported_not_silent():
    A = _spd(50, cond=1e6)
    b = torch.ones(50, dtype=F64)
    with pytest.raises(InputError, match=r"relative residual .* > rtol=1e-10 after max_iter=3"):
        cg(A, b, rtol=1e-10, max_iter=3)
    res = minres(A, b, rtol=1e-10, max_iter=3, check=False)
    assert not res.converged and float(res.residual) > 1e-10
    assert len(res.history) == 3
    with pytest.raises(InputError, match="rtol"):
        cg(A, b, rtol=0.0)
    with pytest.raises(InputError, match="max_iter"):
        cg(A, b, max_iter=0)
    with pytest.raises(InputError, match="shape"):
        cg(A, torch.ones(3, dtype=F64))
    with pytest.raises(InputTypeError, match="precond"):
        cg(A, b, precond="jacobi")
    with pytest.raises(InputError, match="diag \\+ delta > 0"):
        DiagonalPreconditioner(-torch.ones(50, dtype=F64))
    with pytest.raises(InputError, match="preconditioner is not positive definite"):
        minres(A, b, precond=lambda R: -R)


def _damped_ggn_problem():
    """A data-set GGN with badly scaled inputs: a diagonal and a KFAC preconditioner help."""
    torch.manual_seed(0)
    model = register(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                         torch.nn.Linear(8, 3)).double())
    g = torch.Generator().manual_seed(0)
    X = torch.randn(120, 6, generator=g, dtype=F64) * torch.logspace(-1.5, 1.5, 6, dtype=F64)
    Y = torch.randn(120, 3, generator=g, dtype=F64)
    iface = curvop.TorchGGN(model, "regression")
    loader = [(X[i: i + 40], Y[i: i + 40]) for i in range(0, 120, 40)]
    return iface, loader


def test_preconditioners_reach_rtol_in_fewer_products_on_a_damped_ggn():
    iface, loader = _damped_ggn_problem()
    H = iface.dataset_operator(loader).to_dense()
    diag = sum(iface.diag(x, y)[1] for x, y in loader)
    K = None
    for x, y in loader:
        K_b = iface.kron(x, y, 120)[1]
        K = K_b if K is None else K.accumulate(K_b)
    delta, rtol = 1e-2, 1e-8
    A = H + delta * torch.eye(H.shape[0], dtype=F64)
    b = torch.randn(H.shape[0], dtype=F64, generator=torch.Generator().manual_seed(3))
    # products with the dense GGN count like products through the model (checked below)
    plain = cg(H, b, delta=delta, rtol=rtol, max_iter=3000)
    jacobi = cg(H, b, delta=delta, rtol=rtol, precond=diagonal_preconditioner(diag, delta))
    kfac = cg(H, b, delta=delta, rtol=rtol, precond=kron_preconditioner(K, delta))
    for res in (plain, jacobi, kfac):
        assert res.converged and float(_rel_res(A, res.x, b)) <= rtol
    assert jacobi.num_products < 0.75 * plain.num_products
    assert kfac.num_products < 0.5 * plain.num_products
    # through the model (one batch of all the data): same iterations, same tolerance
    x, y = torch.cat([x for x, _ in loader]), torch.cat([y for _, y in loader])
    op = iface.full_operator(x, y)[1]
    model_kfac = cg(op, b, delta=delta, rtol=rtol, precond=kron_preconditioner(K, delta))
    assert float(_rel_res(A, model_kfac.x, b)) <= rtol
    assert abs(model_kfac.num_products - kfac.num_products) <= 0.1 * kfac.num_products
    pm = minres(op, b, delta=delta, rtol=rtol, precond=kron_preconditioner(K, delta))
    assert pm.converged and float(_rel_res(A, pm.x, b)) <= rtol


def _rank_deficient_ggn():
    """A data-set GGN of rank 47 < P = 83 (N·C = 60 rows) with badly scaled inputs."""
    torch.manual_seed(0)
    model = register(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                         torch.nn.Linear(8, 3)).double())
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 6, generator=g, dtype=F64) * torch.logspace(-1.5, 1.5, 6, dtype=F64)
    Y = torch.randn(20, 3, generator=g, dtype=F64)
    loader = [(X[:10], Y[:10]), (X[10:], Y[10:])]
    return curvop.TorchGGN(model, "regression").dataset_operator(loader)


def test_nystrom_preconditioner_beats_plain_cg_counting_its_sketch():
    op = _rank_deficient_ggn()
    H = op.to_dense()
    P = H.shape[0]
    lam, Q = torch.linalg.eigh(H)
    rank = int((lam > 1e-10 * lam[-1]).sum())
    assert rank < P  # rank-deficient: a null space of dimension P - rank at eigenvalue δ
    delta, rtol = 1e-2, 1e-8
    A = H + delta * torch.eye(P, dtype=F64)
    b = torch.randn(P, dtype=F64, generator=torch.Generator().manual_seed(3))
    plain = cg(op, b, delta=delta, rtol=rtol, max_iter=3000)
    pre = nystrom_preconditioner(op, 20, delta, seed=1)
    assert pre.num_products == 20 and pre.rank == 20
    nys = cg(op, b, delta=delta, rtol=rtol, precond=pre)
    for res in (plain, nys):
        assert res.converged and float(_rel_res(A, res.x, b)) <= rtol
    # the sketch's products count: still well under plain CG
    assert nys.num_products + pre.num_products < 0.75 * plain.num_products
    # P⁻¹ is symmetric positive definite, and the identity off the sketched range: the null
    # space of the GGN stays at eigenvalue δ after preconditioning
    Pinv = pre.solve(torch.eye(P, dtype=F64))
    torch.testing.assert_close(Pinv, Pinv.T, rtol=0, atol=1e-12)
    assert float(torch.linalg.eigvalsh(Pinv).min()) > 0
    null = Q[:, : P - rank]
    off = null - pre.U @ (pre.U.T @ null)
    torch.testing.assert_close(pre.solve(off), off, rtol=0, atol=1e-10)
    # the preconditioned spectrum lies in [δ, λ_1 + δ] and its top is squeezed below λ_1 + δ
    Pih = torch.linalg.cholesky(Pinv)
    ev = torch.linalg.eigvalsh(Pih.T @ A @ Pih)
    assert float(ev.min()) >= delta * (1 - 1e-8)
    assert float(ev.max()) < 0.5 * float(lam[-1] + delta)
    # one sketch, another δ: no new products, same guarantees
    pre2 = pre.damped(1e-3)
    assert pre2.num_products == 20 and pre2.U is pre.U
    res2 = cg(op, b, delta=1e-3, rtol=rtol, precond=pre2)
    assert float(_rel_res(H + 1e-3 * torch.eye(P, dtype=F64), res2.x, b)) <= rtol


def test_nystrom_sketch_is_exact_for_low_rank_and_checks_its_input():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=F64))
    lam = torch.cat([torch.logspace(3, 0, 8, dtype=F64), torch.zeros(52, dtype=F64)])
    A = Q @ torch.diag(lam) @ Q.T
    pre = nystrom_preconditioner(A, 12, 0.1)
    torch.testing.assert_close(pre.eigenvalues[:8], lam[:8], rtol=1e-8, atol=1e-8)
    assert float(pre.eigenvalues[8:].abs().max()) < 1e-8
    # Nyström approximation U Λ Uᵀ reproduces A (rank 8 ≤ ℓ = 12)
    torch.testing.assert_close(pre.U @ torch.diag(pre.eigenvalues) @ pre.U.T, A, rtol=0,
                               atol=1e-8)
    with pytest.raises(InputError, match="rank"):
        nystrom_preconditioner(A, 61)
    with pytest.raises(InputTypeError, match="rank"):
        nystrom_preconditioner(A, 2.5)
    with pytest.raises(InputError, match="positive semi-definite"):
        nystrom_preconditioner(-A - torch.eye(60, dtype=F64), 5)
    with pytest.raises(InputError, match="λ̂_ℓ \\+ δ > 0"):
        pre.damped(-1.0)
