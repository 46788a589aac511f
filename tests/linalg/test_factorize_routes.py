"""factorize / logdet / solve: each route against dense float64, many δ against separate ones."""

from __future__ import annotations

import linear_operator
import pytest
import torch
from linear_operator.operators import DenseLinearOperator, DiagLinearOperator

import curvop
from curvop.errors import InputError, InputTypeError, NotSupportedError
from curvop.linalg import factorize, logdet, low_rank_operator, solve

import reference as ref
from cases import register
from linalg_problems import tanh_mlp

F64 = torch.float64
GRID = torch.tensor([1e-3, 0.1, 1.0, 7.5], dtype=F64)


def _psd(n, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank or n + 3, generator=g, dtype=F64)
    return X @ X.T / X.shape[1]


def _dense_logdets(H, deltas):
    eye = torch.eye(H.shape[0], dtype=F64)
    return torch.stack([torch.logdet(H + float(d) * eye) for d in deltas])


def _assert_route(op, H, route, deltas=GRID, solve_delta=0.3):
    fac = factorize(op)
    assert fac.route == route
    torch.testing.assert_close(fac.logdet(deltas), _dense_logdets(H, deltas), rtol=1e-10,
                               atol=1e-8)
    for d in deltas[:2]:  # one δ at a time agrees with the grid
        torch.testing.assert_close(factorize(op).logdet(float(d)), _dense_logdets(H, [d])[0],
                                   rtol=1e-10, atol=1e-8)
    B = torch.randn(H.shape[0], 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    X = torch.linalg.solve(H + solve_delta * torch.eye(H.shape[0], dtype=F64), B)
    torch.testing.assert_close(fac.solve(B, solve_delta), X, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(solve(op, B[:, 1], solve_delta), X[:, 1], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(fac.inv_quad(B, solve_delta), (B * X).sum(0), rtol=1e-8,
                               atol=1e-10)
    return fac


def test_kron_routes_reuse_the_cached_eigenbases():
    A, B, C = _psd(4, seed=1), _psd(3, rank=1, seed=2), _psd(2, seed=3)
    K = curvop.Kron([[A, B], [C]])
    H = torch.block_diag(torch.kron(A, B), C)
    fac = _assert_route(K, H, "kron")
    cache = K._eig_cache
    fac.logdet(GRID * 2)
    assert K._eig_cache is cache  # eigenbases computed once, reused for every δ
    assert torch.allclose(fac.eigenvalues, torch.linalg.eigvalsh(H), atol=1e-12)
    # a damped Kron carries its shift; K.add_jitter is recognised too
    _assert_route(K.damped(0.5), H + 0.5 * torch.eye(14, dtype=F64), "kron")
    # a non-constant diagonal goes through KronAddedDiag's own (exact, small-block) algorithms
    d = torch.linspace(0.1, 1.0, 14, dtype=F64)
    _assert_route(K.add_diagonal(d), H + torch.diag(d), "operator")


def test_diag_lowrank_dense_and_shifted():
    d = torch.linspace(0.0, 3.0, 9, dtype=F64)
    _assert_route(DiagLinearOperator(d), torch.diag(d), "diag")
    U, _ = torch.linalg.qr(torch.randn(30, 4, dtype=F64, generator=torch.Generator()
                                       .manual_seed(0)))
    lam = torch.tensor([5.0, 2.0, 0.5, 1e-3], dtype=F64)
    H = U @ torch.diag(lam) @ U.T
    fac = _assert_route(low_rank_operator(U, lam), H, "dual")
    torch.testing.assert_close(fac.eigenvalues, lam.flip(0), rtol=1e-10, atol=1e-12)
    Hd = _psd(12, seed=4)
    _assert_route(Hd, Hd, "dense")
    _assert_route(DenseLinearOperator(Hd), Hd, "dense")
    # a constant diagonal added with linear_operator's own spelling is folded into δ
    shifted = low_rank_operator(U, lam).add_diagonal(torch.tensor(0.25, dtype=F64))
    fac = factorize(shifted)
    assert fac.route == "dual" and fac.shift == 0.25
    torch.testing.assert_close(fac.logdet(0.5), _dense_logdets(H, [0.75])[0])


def _hessian_problem():
    return tanh_mlp(4, 6, 20)


def test_indefinite_hessian_iterative_route():
    model, X, Y = _hessian_problem()
    _, op = curvop.TorchHessian(model, "classification").full_operator(X, Y)
    H = ref.hessian(model, X, Y, "classification")
    lam = torch.linalg.eigvalsh(H)
    assert lam[0] < -1e-3  # indefinite
    delta = float(-lam[0]) + 0.5
    fac = factorize(op, num_probes=40, max_steps=60, quad_tol=1e-10, rtol=1e-10)
    assert fac.route == "iterative" and not fac.exact
    est = fac.logdet_estimate([delta, delta + 1.0])
    exact = _dense_logdets(H, [delta, delta + 1.0])
    for e, x in zip(est, exact):
        assert e.converged and e.stderr > 0
        assert abs(float(e.value - x)) <= 3 * float(e.stderr)
    b = torch.randn(op.shape[0], dtype=F64)
    x_ref = torch.linalg.solve(H + delta * torch.eye(H.shape[0], dtype=F64), b)
    torch.testing.assert_close(fac.solve(b, delta), x_ref, rtol=1e-8, atol=1e-10)
    # MINRES solves the indefinite system itself (δ = 0.01 leaves it indefinite)
    fm = factorize(op, solver="minres", rtol=1e-10, max_iter=500)
    x_ref = torch.linalg.solve(H + 0.01 * torch.eye(H.shape[0], dtype=F64), b)
    torch.testing.assert_close(fm.solve(b, 0.01), x_ref, rtol=1e-6, atol=1e-8)
    with pytest.raises(InputError, match="positive definite"):
        fac.logdet(0.0)
    with pytest.raises(NotSupportedError, match="no exact spectrum"):
        fac.eigenvalues  # noqa: B018


def test_one_shot_functions_and_errors():
    Hd = _psd(6, seed=7)
    torch.testing.assert_close(logdet(Hd, 0.2), _dense_logdets(Hd, [0.2])[0])
    with pytest.raises(InputError, match="method"):
        factorize(Hd, method="svd")
    with pytest.raises(InputError, match="square"):
        factorize(torch.ones(3, 4, dtype=F64))
    with pytest.raises(InputTypeError, match="LinearOperator or a tensor"):
        factorize([[1.0]])
    with pytest.raises(InputError, match="does not apply"):
        factorize(Hd, method="kron")
    with pytest.raises(InputError, match="finite"):
        factorize(Hd).logdet(float("nan"))
    with pytest.raises(InputTypeError, match="delta"):
        factorize(Hd).logdet("1")
    with pytest.raises(InputError, match="positive definite"):
        factorize(DiagLinearOperator(torch.tensor([-1.0, 1.0], dtype=F64))).logdet(0.5)


def test_damped_operator_routes_linear_operator_calls_through_the_factorisation():
    torch.manual_seed(0)
    model = register(torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                         torch.nn.Linear(7, 3)).double())
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(6, 5, generator=g, dtype=F64), torch.randint(0, 3, (6,), generator=g)
    _, op = curvop.TorchGGN(model, "classification").full_operator(X, Y)
    H = ref.ggn(model, X, Y, "classification")
    A = H + 0.4 * torch.eye(H.shape[0], dtype=F64)
    D = factorize(op).operator(0.4)
    b = torch.randn(H.shape[0], 2, dtype=F64, generator=g)
    torch.testing.assert_close(D @ b, A @ b)
    torch.testing.assert_close(D.diagonal(), A.diagonal())
    torch.testing.assert_close(D.solve(b), torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(D.logdet(), torch.logdet(A), rtol=1e-10, atol=1e-8)
    iq, ld = D.inv_quad_logdet(b, logdet=True)
    torch.testing.assert_close(iq, (b * torch.linalg.solve(A, b)).sum(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ld, torch.logdet(A), rtol=1e-10, atol=1e-8)
    with linear_operator.settings.max_cholesky_size(0):  # no silent fallback to its own CG
        torch.testing.assert_close(linear_operator.solve(D, b), torch.linalg.solve(A, b),
                                   rtol=1e-8, atol=1e-10)
    # a shift already inside the operator stays in its products
    S = factorize(op.add_diagonal(torch.tensor(0.1, dtype=F64))).operator(0.3)
    torch.testing.assert_close(S @ b, A @ b)
    torch.testing.assert_close(S.logdet(), torch.logdet(A), rtol=1e-10, atol=1e-8)
