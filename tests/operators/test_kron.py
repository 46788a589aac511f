"""curvop.Kron and its damped variants against dense ``block_diag(torch.kron(A, B), C, ...)``."""

from __future__ import annotations

import math
import pickle
import unittest

import linear_operator
import pytest
import torch
from linear_operator.operators import (
    ConstantDiagLinearOperator,
    ConstantMulLinearOperator,
    DiagLinearOperator,
    LinearOperator,
    SumLinearOperator,
)
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase

from curvop.errors import InputError, InputTypeError, MemoryBudgetError, NotSupportedError
from curvop.operators.kron import Kron
from curvop.operators.kron_damped import DampedKron, KronAddedDiag

F64 = torch.float64
TOL64 = dict(rtol=1e-10, atol=1e-10)
TOL32 = dict(rtol=1e-4, atol=1e-4)
EYE = torch.eye(30, dtype=F64)


# ---------------------------------------------------------------------------- helpers
def psd(n, rank=None, dtype=F64, gen=None, ridge=0.1):
    """A random PSD matrix; ``rank`` < n gives an exactly rank-deficient one (no ridge)."""
    X = torch.randn(n, rank or n + 2, generator=gen, dtype=F64)
    M = X @ X.T / X.shape[1] + (0.0 if rank else ridge * torch.eye(n, dtype=F64))
    return M.to(dtype)


def dense(kfacs):
    return torch.block_diag(*(torch.kron(*b) if len(b) == 2 else b[0] for b in kfacs))


def make_kfacs(dtype=F64, singular=False, seed=0):
    """Three [A, B] blocks and two [C] blocks; ``singular`` makes factors rank-1 (batch size 1)."""
    g = torch.Generator().manual_seed(seed)
    r = 1 if singular else None
    return [
        [psd(3, r, dtype, g), psd(4, r, dtype, g)],
        [psd(3, r, dtype, g)],
        [psd(2, r, dtype, g), psd(5, r, dtype, g)],
        [psd(1, None, dtype, g), psd(3, r, dtype, g)],
        [psd(2, r, dtype, g)],
    ]


def sym(G):
    """Factors are symmetric: gradients are compared along symmetric directions."""
    return (G + G.mT) / 2


def shifts(K, per_block):
    return torch.repeat_interleave(per_block, torch.tensor(K.block_sizes))


@pytest.fixture
def kfacs():
    return make_kfacs()


@pytest.fixture
def K(kfacs):
    return Kron(kfacs)


def rhs(P, *shape, dtype=F64, seed=1):
    return torch.randn(P, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------- structure, products
def test_structure_and_roundtrip_of_kfacs(kfacs):
    K = Kron([tuple(b) for b in kfacs])  # tuples are accepted too
    torch.testing.assert_close(Kron(kfacs=kfacs).to_dense(), K.to_dense(), rtol=0, atol=0)
    assert K.shape == (30, 30) and K.layout == (2, 1, 2, 2, 1) and K.num_blocks == 5
    assert K.block_sizes == (12, 3, 10, 3, 2) and K.dtype == F64 and K.device.type == "cpu"
    assert all(F is G for blk, ref in zip(K.kfacs, kfacs) for F, G in zip(blk, ref))
    assert "Kron(P=30" in repr(K)


@pytest.mark.parametrize("dtype,tol", [(F64, TOL64), (torch.float32, TOL32)])
@pytest.mark.parametrize("singular", [False, True])
def test_matmul_dense_diagonal_match_reference(dtype, tol, singular):
    kf = make_kfacs(dtype, singular)
    K, D = Kron(kf), dense(kf)
    torch.testing.assert_close(K.to_dense(), D, rtol=0, atol=0)
    torch.testing.assert_close(K.diagonal(), D.diagonal(), **tol)
    for x in (rhs(30, dtype=dtype), rhs(30, 3, dtype=dtype), torch.randn(2, 30, 3, dtype=dtype)):
        torch.testing.assert_close(K @ x, D @ x, **tol)
        torch.testing.assert_close(torch.matmul(K, x), D @ x, **tol)
    x = rhs(30, 3, dtype=dtype)
    torch.testing.assert_close(x.T @ K, x.T @ D, **tol)


def test_indexing_is_exact(K, kfacs):
    D = dense(kfacs)
    r, c = torch.tensor([0, 5, 13, 20, 29, 12]), torch.tensor([0, 11, 13, 21, 28, 3])
    torch.testing.assert_close(K[r, c], D[r, c], **TOL64)
    torch.testing.assert_close(K[10:20, 5:30].to_dense(), D[10:20, 5:30], **TOL64)
    torch.testing.assert_close(K.add_jitter(0.3)[r, c], (D + 0.3 * EYE)[r, c], **TOL64)


def test_to_dense_refuses_what_does_not_fit():
    A = torch.eye(2000, dtype=torch.float32)
    K = Kron([[A, A]])  # P = 4e6: the dense matrix would need 64 TB
    with pytest.raises(MemoryBudgetError, match=r"Kron.to_dense\(\) of shape .* needs [0-9.]+ TiB"):
        K.to_dense()
    assert K.diagonal().sum() == K.shape[-1]  # lazy routines still fine


# ---------------------------------------------------------------------------- eigendecomposition
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_rank_one_factors_give_exact_zero_eigenvalues(dtype):
    kf = make_kfacs(dtype, singular=True)
    K = Kron(kf)
    for blk, pairs in zip(kf, K._factor_eigs()):
        for F, (lam, Q) in zip(blk, pairs):
            assert lam.dtype == F64 and (lam >= 0).all()
            if F.shape[0] > 1:
                assert (lam == 0).sum() == F.shape[0] - 1  # rank 1
            torch.testing.assert_close((Q * lam) @ Q.T, F.to(F64), rtol=1e-5, atol=1e-5)
    assert K.logdet() == -math.inf
    with pytest.raises(InputError, match="solve\\(\\) needs a positive definite operator"):
        K.solve(rhs(30, dtype=dtype))


def test_eigendecomposition_is_cached_and_refreshed_on_inplace_change(K, monkeypatch):
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda M: calls.append(1) or eigh(M))
    Kd = K.damped(0.5)
    Kd.logdet(), Kd.solve(rhs(30)), Kd.inv_quad_logdet(rhs(30, 2), True), Kd.root_decomposition()
    assert len(calls) == 8  # one per factor, once
    with torch.no_grad():
        K.kfacs[0][0].mul_(2.0)  # in-place change of a factor is noticed
    D = dense(K.kfacs) + 0.5 * EYE
    torch.testing.assert_close(Kd.logdet(), torch.logdet(D), **TOL64)
    assert len(calls) == 16


def test_non_psd_factor_is_refused_by_spectral_routines():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    K = Kron([[A, torch.eye(2, dtype=F64)]])
    expected = torch.tensor([1.0, 1, -1, -1], dtype=F64)
    torch.testing.assert_close(K @ torch.ones(4, dtype=F64), expected)
    with pytest.raises(InputError, match="factor 0 of block 0 must be positive semi-definite"):
        K.damped(5.0).logdet()


def test_eigh_and_roots_are_exact(K, kfacs):
    Kd, D = K.damped(0.2), dense(kfacs) + 0.2 * EYE
    evals, evecs = torch.linalg.eigh(Kd)
    torch.testing.assert_close(torch.sort(evals).values, torch.linalg.eigvalsh(D), **TOL64)
    torch.testing.assert_close((evecs.to_dense() * evals) @ evecs.to_dense().T, D, **TOL64)
    torch.testing.assert_close(Kd.root_decomposition().to_dense(), D, **TOL64)
    torch.testing.assert_close(K.root_decomposition().to_dense(), dense(kfacs), **TOL64)
    torch.testing.assert_close(Kd.root_inv_decomposition().to_dense(), torch.linalg.inv(D), **TOL64)
    x = rhs(30, 2)
    L = torch.linalg.cholesky(D)
    ev, V = torch.linalg.eigh(D)
    torch.testing.assert_close(Kd.sqrt_inv_matmul(x), (V * ev.rsqrt()) @ V.T @ x, **TOL64)
    lhs = rhs(3, 30, seed=2)
    res, iq = Kd.sqrt_inv_matmul(x, lhs)
    torch.testing.assert_close(iq, (lhs @ torch.cholesky_inverse(L) * lhs).sum(-1), **TOL64)


# ---------------------------------------------------------------------------- exact linear algebra
def test_undamped_logdet_and_solve(K, kfacs):
    D = dense(kfacs)
    torch.testing.assert_close(K.logdet(), torch.logdet(D), **TOL64)
    torch.testing.assert_close(torch.logdet(K), torch.logdet(D), **TOL64)
    for x in (rhs(30), rhs(30, 4), torch.randn(2, 30, 3, dtype=F64)):
        torch.testing.assert_close(K.solve(x), torch.linalg.solve(D, x), **TOL64)
    lhs = rhs(5, 30, seed=3)
    x = rhs(30, 2)
    torch.testing.assert_close(K.solve(x, lhs), lhs @ torch.linalg.solve(D, x), **TOL64)
    iq, ld = K.inv_quad_logdet(x, logdet=True, reduce_inv_quad=False)
    torch.testing.assert_close(iq, (x * torch.linalg.solve(D, x)).sum(0), **TOL64)
    torch.testing.assert_close(ld, torch.logdet(D), **TOL64)
    iq, ld = K.inv_quad_logdet(x[:, 0], logdet=False)
    assert iq.shape == () and ld.numel() == 0


@pytest.mark.parametrize("singular", [False, True])
@pytest.mark.parametrize("per_block", [False, True])
def test_damped_is_exact(singular, per_block):
    kf = make_kfacs(singular=singular)
    K = Kron(kf)
    delta = torch.tensor([0.1, 0.5, 2.0, 0.3, 1e-3], dtype=F64) if per_block else 0.25
    Kd = K.damped(delta if not per_block else delta.tolist())
    d = shifts(K, delta) if per_block else torch.full((30,), delta, dtype=F64)
    D = dense(kf) + torch.diag(d)
    assert isinstance(Kd, DampedKron) and Kd.kron.layout == K.layout
    torch.testing.assert_close(Kd.to_dense(), D, **TOL64)
    torch.testing.assert_close(Kd.diagonal(), D.diagonal(), **TOL64)
    x = rhs(30, 3)
    torch.testing.assert_close(Kd @ x, D @ x, **TOL64)
    torch.testing.assert_close(Kd.logdet(), torch.logdet(D), **TOL64)
    torch.testing.assert_close(Kd.solve(x), torch.linalg.solve(D, x), rtol=1e-9, atol=1e-9)
    iq, ld = Kd.inv_quad_logdet(x, logdet=True)
    torch.testing.assert_close(iq, (x * torch.linalg.solve(D, x)).sum(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ld, torch.logdet(D), **TOL64)


def test_damped_float32_with_rank_one_factors_is_accurate():
    kf32 = make_kfacs(torch.float32, singular=True)
    Kd = Kron(kf32).damped(0.1)
    D = dense([[F.double() for F in b] for b in kf32]) + 0.1 * EYE
    x = rhs(30, 2)
    assert Kd.logdet().dtype == torch.float32
    torch.testing.assert_close(Kd.logdet().double(), torch.logdet(D), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(Kd.solve(x.float()).double(), torch.linalg.solve(D, x), **TOL32)


def test_damping_routes(K, kfacs):
    D = dense(kfacs)
    blockwise = shifts(K, torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=F64))
    routes = {
        "add_jitter": K.add_jitter(0.3),
        "add_diagonal scalar": K.add_diagonal(torch.tensor(0.3, dtype=F64)),
        "add_diagonal (1,)": K.add_diagonal(torch.tensor([0.3], dtype=F64)),
        "add_diagonal float": K.add_diagonal(0.3),
        "linear_operator.add_jitter": linear_operator.add_jitter(K, 0.3),
        "+ ConstantDiag": K + ConstantDiagLinearOperator(torch.tensor([0.3], dtype=F64), 30),
        "+ Diag": K + DiagLinearOperator(torch.full((30,), 0.3, dtype=F64)),
        "damped": K.damped(0.3),
    }
    for name, op in routes.items():
        assert isinstance(op, DampedKron), name
        torch.testing.assert_close(op.logdet(), torch.logdet(D + 0.3 * EYE), **TOL64)
    op = K.add_diagonal(blockwise)  # constant on each block: still exact eigenbasis
    assert isinstance(op, DampedKron)
    torch.testing.assert_close(op.logdet(), torch.logdet(D + torch.diag(blockwise)), **TOL64)
    stacked = K.damped(0.1).damped([0.0, 0.1, 0.0, 0.0, 0.0]).add_jitter(0.2)
    torch.testing.assert_close(stacked.delta, torch.tensor([0.3, 0.4, 0.3, 0.3, 0.3], dtype=F64))
    nonconst = torch.linspace(0.1, 1.0, 30, dtype=F64)
    op = K.add_diagonal(nonconst)
    assert isinstance(op, KronAddedDiag)  # never KroneckerProductAddedDiagLinearOperator
    torch.testing.assert_close(op.logdet(), torch.logdet(D + torch.diag(nonconst)), **TOL64)
    both = K.damped(0.5).add_diagonal(nonconst).add_jitter(0.1).damped([1, 0, 0, 0, 0])
    extra = nonconst + 0.6 + shifts(K, torch.tensor([1.0, 0, 0, 0, 0], dtype=F64))
    torch.testing.assert_close(both.diag, extra, **TOL64)
    torch.testing.assert_close(both.to_dense(), D + torch.diag(extra), **TOL64)


def test_damped_never_densifies(K, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("densified")

    for cls in (LinearOperator, Kron, DampedKron):
        monkeypatch.setattr(cls, "to_dense", boom)
    monkeypatch.setattr(torch, "kron", boom)
    monkeypatch.setattr(torch, "block_diag", boom)
    Kd, x = K.damped(0.3), rhs(30, 2)
    for settings in (linear_operator.settings.max_cholesky_size(10**9),
                     linear_operator.settings.max_cholesky_size(0)):
        with settings:
            Kd.solve(x), Kd.logdet(), Kd.inv_quad_logdet(x, True), Kd.diagonal(), Kd @ x
            linear_operator.solve(Kd, x), linear_operator.root_decomposition(Kd) @ x
            linear_operator.root_inv_decomposition(Kd) @ x, torch.linalg.eigh(Kd)


@pytest.mark.parametrize("op_name", ["kron", "damped", "added_dense", "added_iter"])
@pytest.mark.parametrize("cholesky", [True, False])
@pytest.mark.parametrize("precond", [True, False])
def test_linear_operator_routines(op_name, cholesky, precond, K, kfacs):
    d = torch.linspace(0.2, 1.0, 30, dtype=F64)
    op, D = {
        "kron": (K, dense(kfacs)),
        "damped": (K.damped(0.3), dense(kfacs) + 0.3 * EYE),
        "added_dense": (K.add_diagonal(d), dense(kfacs) + torch.diag(d)),
        "added_iter": (K.add_diagonal(d, dense_max=0, rtol=1e-12), dense(kfacs) + torch.diag(d)),
    }[op_name]
    x = rhs(30, 3)
    exact = op_name != "added_iter"
    with (
        linear_operator.settings.max_cholesky_size(10**6 if cholesky else 0),
        linear_operator.settings.max_preconditioner_size(15 if precond else 0),
    ):
        torch.testing.assert_close(linear_operator.solve(op, x), torch.linalg.solve(D, x),
                                   rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(torch.linalg.solve(op, x), torch.linalg.solve(D, x),
                                   rtol=1e-9, atol=1e-9)
        iq, ld = op.inv_quad_logdet(x, logdet=True, reduce_inv_quad=False)
        torch.testing.assert_close(iq, (x * torch.linalg.solve(D, x)).sum(0), rtol=1e-9, atol=1e-9)
        if exact:
            torch.testing.assert_close(ld, torch.logdet(D), **TOL64)
            R = linear_operator.root_decomposition(op)
            torch.testing.assert_close(R @ x, D @ x, **TOL64)
        else:
            est, se = op.logdet_estimate()
            assert abs(est - torch.logdet(D)) <= 4 * se + 1e-10 * abs(est)
            with pytest.raises(NotSupportedError, match="no exact form for block 0"):
                linear_operator.root_decomposition(op)


# ---------------------------------------------------------------------------- KronAddedDiag
def _big_problem(seed=0, spread=10.0, ranks=(5, 8), sizes=(20, 30), ridge=0.0):
    """One large ``[A, B]`` block (``ranks`` None: full rank) and a small ``[C]``, plus a ``d``."""
    g = torch.Generator().manual_seed(seed)
    A, B = (psd(n, r, gen=g) + ridge * torch.eye(n, dtype=F64) for n, r in zip(sizes, ranks))
    kf = [[A, B], [psd(6, gen=g)]]
    n = sizes[0] * sizes[1] + 6
    d = 0.1 * torch.exp(torch.rand(n, generator=g, dtype=F64) * math.log(spread))
    return Kron(kf), d, dense(kf) + torch.diag(d)


@pytest.mark.parametrize("rtol", [1e-4, 1e-6, 1e-10])
@pytest.mark.parametrize("ranks", [(5, 8), (None, None)])
def test_added_diag_iterative_solve_meets_rtol(rtol, ranks):
    K, d, D = _big_problem(ranks=ranks, sizes=(20, 30))
    op = K.add_diagonal(d, dense_max=0, rtol=rtol)
    assert op._plan() == ["iter", "dense"]
    b = torch.cat([rhs(606, 3), torch.zeros(606, 1, dtype=F64)], dim=1)
    x = op.solve(b)
    assert (x[:, 3] == 0).all()  # a zero column is solved exactly
    for blk in (slice(0, 600), slice(600, 606)):
        res = (D[blk, blk] @ x[blk, :3] - b[blk, :3]).norm(dim=0) / b[blk, :3].norm(dim=0)
        assert (res <= rtol).all(), res
    ev = torch.linalg.eigvalsh(D)
    err = (x - torch.linalg.solve(D, b)).norm() / torch.linalg.solve(D, b).norm()  # ≤ κ rtol
    assert err <= ev[-1] / ev[0] * rtol


def test_added_diag_dense_path_is_exact_and_differentiable():
    K, d, D = _big_problem()
    op = K.add_diagonal(d)  # 600 <= dense_max = 2048: exact block Cholesky
    assert op._plan() == ["dense", "dense"] and op.logdet_estimate()[1] == 0.0
    torch.testing.assert_close(op.logdet(), torch.logdet(D), **TOL64)
    b = rhs(606, 2)
    torch.testing.assert_close(op.solve(b), torch.linalg.solve(D, b), rtol=1e-9, atol=1e-9)
    dd = d.clone().requires_grad_(True)
    op = K.add_diagonal(dd)
    with torch.no_grad():  # fills the caches, which must not cut the graph
        op.logdet(), op.solve(b)
    g_op = torch.autograd.grad(op.logdet(), dd)[0]
    torch.testing.assert_close(g_op, torch.linalg.inv(D).diagonal(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "seed,spread,ranks,sizes,ridge,precond",
    [
        (0, 10.0, (5, 8), (20, 30), 0.0, "_LowRankDiagPrecond"),  # rank 40: exact, se = 0
        (1, 100.0, (4, 6), (20, 30), 1e-2, "_LowRankDiagPrecond"),  # fast-decaying, full rank
        (2, 10.0, (None, None), (30, 30), 0.0, "_EigPrecond"),  # flat spectrum
        (3, 1.05, (None, None), (30, 30), 0.0, "_EigPrecond"),  # nearly constant d
    ],
)
def test_added_diag_logdet_estimate_meets_stated_accuracy(seed, spread, ranks, sizes, ridge,
                                                           precond):
    K, d, D = _big_problem(seed, spread, ranks, sizes, ridge)
    n = sizes[0] * sizes[1]
    op = K.add_diagonal(d, dense_max=0, precond_rank=64)
    assert op._plan() == ["iter", "dense"]
    assert type(op._block_data()[0]["pre"]).__name__ == precond
    est, se = op.logdet_estimate()
    true = torch.logdet(D)
    assert se <= 1e-3 * n  # a standard error below 1e-3 per dimension of the block
    assert abs(est - true) <= 4 * se + 1e-10 * abs(true)  # honest: within 4 standard errors
    upper = sum(i["pre"].logdet + i["pre"].trace_dev for i in op._block_data() if "pre" in i)
    assert upper + torch.logdet(D[n:, n:]) >= true - 1e-9  # log det P + tr(M̃ - I) bounds it


def test_added_diag_logdet_estimate_is_seeded():
    K, d, _ = _big_problem(ranks=(None, None), sizes=(10, 12))
    opts = dict(dense_max=0, num_probes=8, precond_rank=0)  # eigenbasis preconditioner
    est = K.add_diagonal(d, **opts).logdet_estimate()[0]
    assert K.add_diagonal(d, **opts).logdet_estimate()[0] == est
    assert K.add_diagonal(d, seed=7, **opts).logdet_estimate()[0] != est


def test_added_diag_more_probes_shrink_the_error():
    K, d, D = _big_problem(ranks=(None, None), sizes=(12, 15))
    se = [K.add_diagonal(d, dense_max=0, num_probes=s, precond_rank=0).logdet_estimate()[1]
          for s in (8, 128)]
    assert se[1] < 0.5 * se[0]


def test_added_diag_gradients():
    K, d, D = _big_problem()
    kf = [[F.clone().requires_grad_(True) for F in blk] for blk in K.kfacs]
    dd = d.clone().requires_grad_(True)
    b = rhs(606)
    op = Kron(kf).add_diagonal(dd, dense_max=0, rtol=1e-12)
    (op.solve(b) ** 2).sum().backward()
    ref_kf = [[F.detach().clone().requires_grad_(True) for F in blk] for blk in kf]
    ref_d = d.clone().requires_grad_(True)
    (torch.linalg.solve(dense(ref_kf) + torch.diag(ref_d), b) ** 2).sum().backward()
    torch.testing.assert_close(dd.grad, ref_d.grad, rtol=1e-7, atol=1e-9)
    for blk, ref in zip(kf, ref_kf):
        for F, G in zip(blk, ref):
            torch.testing.assert_close(sym(F.grad), sym(G.grad), rtol=1e-7, atol=1e-9)
    with pytest.raises(NotSupportedError, match="stochastic estimate without gradients"):
        op.logdet()
    with torch.no_grad():
        assert torch.isfinite(op.logdet())


def test_added_diag_failures_are_loud():
    K, d, _ = _big_problem(spread=1000.0, ranks=(None, None), sizes=(10, 12))
    with pytest.raises(InputError, match="CG reached relative residual .* max_iter=2"):
        K.add_diagonal(d, dense_max=0, max_iter=2, precond_rank=0).solve(rhs(126))
    neg = d.clone()
    neg[5] = -1.0
    with pytest.raises(InputError, match="`diag` must be ≥ 0 on block 0"):
        K.add_diagonal(neg, dense_max=0).solve(rhs(126))
    with pytest.raises(InputError, match="block 1 of K \\+ diag\\(d\\) is not positive definite"):
        K.add_diagonal(torch.cat([d[:120], -10 * torch.ones(6, dtype=F64)])).logdet()
    with pytest.raises(NotSupportedError, match="sqrt_inv_matmul\\(\\) has no exact form"):
        K.add_diagonal(d, dense_max=0).sqrt_inv_matmul(rhs(126))
    for bad, msg in [(dict(rtol=2.0), "`rtol` must be in"), (dict(max_iter=0), "`max_iter`"),
                     (dict(num_probes=1), "`num_probes`"), (dict(dense_max=-1), "`dense_max`"),
                     (dict(precond_rank=-1), "`precond_rank`")]:
        with pytest.raises(InputError, match=msg):
            K.add_diagonal(d, **bad)


# ---------------------------------------------------------------------------- algebra
def test_scalar_multiplication(K, kfacs):
    D = dense(kfacs)
    for op in (K * 2.0, 2.0 * K, K * torch.tensor(2.0, dtype=F64), torch.mul(K, 2.0), K / 0.5):
        assert isinstance(op, Kron)
        torch.testing.assert_close(op.to_dense(), 2 * D, **TOL64)
        torch.testing.assert_close(op.logdet(), torch.logdet(2 * D), **TOL64)
    scaled = K * 3.0
    assert torch.equal(scaled.kfacs[0][0], 3 * kfacs[0][0])  # A scaled, B untouched
    assert torch.equal(scaled.kfacs[0][1], kfacs[0][1])
    assert torch.equal(scaled.kfacs[1][0], 3 * kfacs[1][0])
    neg = K * -1.0
    assert isinstance(neg, ConstantMulLinearOperator)
    torch.testing.assert_close(neg.to_dense(), -D, **TOL64)
    Kd = K.damped(0.5) * 2.0
    assert isinstance(Kd, DampedKron)
    torch.testing.assert_close(Kd.to_dense(), 2 * D + EYE, **TOL64)
    d = torch.linspace(0.1, 1, 30, dtype=F64)
    torch.testing.assert_close((K.add_diagonal(d) * 2.0).to_dense(), 2 * (D + torch.diag(d)))


def test_sum_is_exact_and_accumulate_is_factorwise():
    k1, k2 = make_kfacs(seed=0), make_kfacs(seed=1)
    K1, K2 = Kron(k1), Kron(k2)
    S = K1 + K2
    assert isinstance(S, SumLinearOperator)
    torch.testing.assert_close(S.to_dense(), dense(k1) + dense(k2), **TOL64)
    x = rhs(30, 2)
    torch.testing.assert_close(S @ x, (dense(k1) + dense(k2)) @ x, **TOL64)
    acc = K1.accumulate(K2)
    assert isinstance(acc, Kron)
    summed = [[F + G for F, G in zip(b1, b2)] for b1, b2 in zip(k1, k2)]
    torch.testing.assert_close(acc.to_dense(), dense(summed), **TOL64)
    assert not torch.allclose(acc.to_dense(), S.to_dense())  # accumulate is not +
    assert K1 + 0 is K1
    with pytest.raises(InputTypeError, match="would add 1.0 to every entry"):
        K1 + 1.0
    with pytest.raises(InputTypeError, match="`other` must be a Kron; got DampedKron"):
        K1.accumulate(K2.damped(1.0))
    with pytest.raises(InputError, match="`other` must have the same blocks"):
        K1.accumulate(Kron(k2[:-1]))


@pytest.mark.parametrize("op_name", ["kron", "damped", "added"])
def test_rebuilds_round_trip(op_name, K):
    d = torch.linspace(0.1, 1, 30, dtype=F64)
    op = {"kron": K, "damped": K.damped(torch.linspace(0.1, 0.5, 5, dtype=F64)),
          "added": K.add_diagonal(d, rtol=1e-8, seed=3)}[op_name]
    ref = op.to_dense()
    for new in (op.to(torch.float32), op.float(), op.type(torch.float32)):
        assert type(new) is type(op) and new.dtype == torch.float32
        torch.testing.assert_close(new.to_dense().double(), ref, **TOL32)
        torch.testing.assert_close(new.to(F64).to_dense(), ref, **TOL32)
    for new in (op.detach(), op.clone(), op.to(F64), op.double(), pickle.loads(pickle.dumps(op))):
        assert type(new) is type(op) and new.dtype == F64 and new.layout == op.layout
        torch.testing.assert_close(new.to_dense(), ref, rtol=0, atol=0)
    if op_name == "added":
        assert op.detach().options == {"rtol": 1e-8, "max_iter": 1000, "dense_max": 2048,
                                       "num_probes": 64, "seed": 3, "precond_rank": 512}
    assert op.to(torch.float32).logdet().dtype == torch.float32


def test_gradients_of_exact_routines(kfacs):
    kf = [[F.clone().requires_grad_(True) for F in b] for b in kfacs]
    delta = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=F64, requires_grad=True)
    x = rhs(30, 2)
    Kd = Kron(kf).damped(delta)
    with torch.no_grad():  # fills the eigendecomposition cache, which must not cut the graph
        Kd.logdet(), Kd.solve(x)
    (Kd.logdet() + (Kd.solve(x) ** 2).sum() + Kd.inv_quad(x)).backward()
    rf = [[F.detach().clone().requires_grad_(True) for F in b] for b in kfacs]
    rd = delta.detach().clone().requires_grad_(True)
    D = dense(rf) + torch.diag(shifts(Kron(kfacs), rd))
    (torch.logdet(D) + (torch.linalg.solve(D, x) ** 2).sum()
     + (x * torch.linalg.solve(D, x)).sum()).backward()
    torch.testing.assert_close(delta.grad, rd.grad, rtol=1e-8, atol=1e-10)
    for b1, b2 in zip(kf, rf):
        for F, G in zip(b1, b2):
            torch.testing.assert_close(sym(F.grad), sym(G.grad), rtol=1e-8, atol=1e-10)


# ---------------------------------------------------------------------------- errors
def test_constructor_errors():
    A = torch.eye(2, dtype=F64)
    cases = [
        (A, InputTypeError, "`kfacs` must be a list of blocks"),
        ([], InputError, "`kfacs` must hold at least one block"),
        ([A], InputTypeError, "`kfacs\\[0\\]` must be a list \\[A, B\\] or \\[C\\]"),
        ([[A, A, A]], InputError, "`kfacs\\[0\\]` must hold 1 factor .* got 3"),
        ([[A, "B"]], InputTypeError, "`kfacs\\[0\\]\\[1\\]` must be a torch.Tensor; got str"),
        ([[torch.ones(2, 3, dtype=F64)]], InputError, "non-empty square 2-D tensor; got shape"),
        ([[torch.ones(2, 2, 2)]], InputError, "square 2-D tensor; got shape \\(2, 2, 2\\)"),
        ([[torch.eye(2, dtype=torch.int64)]], InputTypeError, "real floating dtype"),
        ([[A], [torch.eye(2)]], InputTypeError, "dtype of the first factor \\(torch.float64\\)"),
        ([[A * math.nan]], InputError, "`kfacs\\[0\\]\\[0\\]` must be finite"),
        ([[torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64)]], InputError, "must be symmetric"),
    ]
    for kfacs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            Kron(kfacs)
    with pytest.raises(InputTypeError, match="Kron takes one argument `kfacs`"):
        Kron([[A]], [[A]])
    with pytest.raises(InputError, match="`layout` must list 1 or 2 factors"):
        Kron(A, A, layout=(1,))


def test_argument_errors(K):
    with pytest.raises(InputError, match="must have shape \\(P,\\), .* P = 30; got \\(40,\\)"):
        K @ torch.ones(40, dtype=F64)
    with pytest.raises(InputTypeError, match="`other` must have dtype torch.float64; got torch.f"):
        K @ torch.ones(30)
    with pytest.raises(InputError, match="`right_tensor` must have shape"):
        K.damped(1.0).solve(torch.ones(3, dtype=F64))
    with pytest.raises(InputError, match="`delta` must be a scalar or have one entry per block"):
        K.damped([1.0, 2.0])
    with pytest.raises(InputError, match="`delta` must be finite"):
        K.damped(math.inf)
    with pytest.raises(InputTypeError, match="`delta` must be a real number or tensor; got str"):
        K.damped("1")
    with pytest.raises(InputError, match="`diag` must be a scalar or have shape \\(30,\\); got"):
        K.add_diagonal(torch.ones(3, dtype=F64))
    with pytest.raises(InputError, match="needs `inv_quad_rhs` or `logdet=True`"):
        K.inv_quad_logdet()
    with pytest.raises(InputError, match="logdet\\(\\) needs a positive semi-definite operator"):
        K.damped(-100.0).logdet()


@pytest.mark.parametrize("op_name", ["kron", "damped", "added"])
def test_batch_hooks_raise_clearly(op_name, K):
    op = {"kron": K, "damped": K.damped(1.0),
          "added": K.add_diagonal(torch.linspace(0.1, 1, 30, dtype=F64))}[op_name]
    msg = "is a single \\(P, P\\) matrix and has no batch dimensions"
    for call in (lambda: op.unsqueeze(0), lambda: op.expand(3, 30, 30),
                 lambda: op.reshape(1, 30, 30), lambda: op._permute_batch(0),
                 lambda: op._getitem(slice(None), slice(None), 0),
                 lambda: op + torch.ones(2, 30, 30, dtype=F64)):
        with pytest.raises(NotSupportedError, match=msg):
            call()
    assert op.expand(30, 30) is op


# ---------------------------------------------------------------------------- linear_operator suite
def _lo_kfacs():
    g = torch.Generator().manual_seed(1)
    return [[psd(2, None, torch.float32, g, 0.5), psd(3, None, torch.float32, g, 0.5)],
            [psd(3, None, torch.float32, g, 0.5)],
            [psd(2, None, torch.float32, g, 0.5), psd(2, None, torch.float32, g, 0.5)]]


class _KronSuite(LinearOperatorTestCase):
    """linear_operator's own test-suite; batch tests assert the clear error instead."""

    seed = 0
    should_call_cg = False  # solves are exact eigenbasis computations
    should_call_lanczos = False
    should_call_lanczos_diagonalization = False
    batch_msg = "is a single \\(P, P\\) matrix and has no batch dimensions"

    def create_linear_op(self):
        return Kron(_lo_kfacs())

    def evaluate_linear_op(self, op):
        shift = op._shift_full()
        base = dense(op.kfacs)
        return base if shift is None else base + torch.diag(shift)

    def test_add(self):
        op = self.create_linear_op()
        ev = self.evaluate_linear_op(op)
        rhs = torch.randn(op.shape)
        self.assertAllClose((op + rhs).to_dense(), ev + rhs)
        self.assertAllClose((rhs + op).to_dense(), ev + rhs)
        self.assertAllClose((op + op).to_dense(), ev * 2)
        with pytest.raises(NotSupportedError, match=self.batch_msg):
            op + torch.randn(2, *op.shape)

    def test_cat_rows(self):
        op = self.create_linear_op()
        ev = self.evaluate_linear_op(op)
        new_rows, new_point = 1e-4 * torch.randn(1, op.shape[-1]), torch.rand(1, 1)
        new = op.cat_rows(new_rows, new_point)
        top = torch.cat((ev, new_rows), dim=-2)
        right = torch.cat((new_rows.mT, new_point))
        self.assertAllClose(new.to_dense(), torch.cat((top, right), -1))
        with pytest.raises(NotSupportedError, match=self.batch_msg):
            op.cat_rows(torch.randn(2, 1, op.shape[-1]), torch.rand(2, 1, 1))

    def test_expand(self):
        op = self.create_linear_op()
        self.assertEqual(op.expand(*op.shape).shape, op.shape)
        with pytest.raises(NotSupportedError, match=self.batch_msg):
            op.expand(3, *op.shape)
        with pytest.raises(RuntimeError, match="Invalid expand arguments"):
            op.expand(4, 5)

    def test_reshape(self):
        with pytest.raises(NotSupportedError, match=self.batch_msg):
            self.create_linear_op().reshape(-1, *self.create_linear_op().shape)

    def test_squeeze_unsqueeze(self):
        with pytest.raises(NotSupportedError, match=self.batch_msg):
            torch.unsqueeze(self.create_linear_op(), -3)


class TestKronSuite(_KronSuite, unittest.TestCase):
    pass


class TestDampedKronSuite(_KronSuite, unittest.TestCase):
    def create_linear_op(self):
        return Kron(_lo_kfacs()).damped(torch.tensor([0.1, 0.2, 0.3]))


class TestKronAddedDiagSuite(_KronSuite, unittest.TestCase):
    def create_linear_op(self):
        d = torch.rand(13, generator=torch.Generator().manual_seed(3)) + 0.1
        return Kron(_lo_kfacs()).add_diagonal(d)


class TestKronAddedDiagIterativeSuite(_KronSuite, unittest.TestCase):
    """The iterative path: no exact roots, and no gradient through the stochastic logdet."""

    tolerances = {**_KronSuite.tolerances, "logdet": {"rtol": 0.05, "atol": 0.05}}

    def create_linear_op(self):
        d = torch.rand(13, generator=torch.Generator().manual_seed(3)) + 0.1
        return Kron(_lo_kfacs()).add_diagonal(d, dense_max=0, rtol=1e-7)

    def _no_root(self, call):
        with pytest.raises(NotSupportedError, match="has no exact form for block 0"):
            call(self.create_linear_op())

    def test_root_decomposition(self, cholesky=False):
        self._no_root(linear_operator.root_decomposition)

    def test_root_decomposition_cholesky(self):
        self._no_root(linear_operator.root_decomposition)
        self._test_inv_quad_logdet()

    def test_root_inv_decomposition(self):
        self._no_root(linear_operator.root_inv_decomposition)

    def test_cat_rows(self):
        self._no_root(lambda op: op.cat_rows(torch.randn(1, op.shape[-1]), torch.rand(1, 1)))

    def test_add_low_rank(self):
        self._no_root(lambda op: op.add_low_rank(torch.randn(op.shape[-1], 3)))

    def test_sqrt_inv_matmul(self):
        self._no_root(lambda op: op.sqrt_inv_matmul(torch.randn(op.shape[-1], 3)))

    def test_sqrt_inv_matmul_no_lhs(self):
        self.test_sqrt_inv_matmul()

    def test_logdet(self):
        op = self.create_linear_op().detach().requires_grad_(True)
        with pytest.raises(NotSupportedError, match="stochastic estimate without gradients"):
            op.add_jitter(0.5).logdet()
        with torch.no_grad():
            est, se = op.add_jitter(0.5).logdet_estimate()
        true = torch.logdet(self.evaluate_linear_op(op.detach()) + 0.5 * torch.eye(op.shape[-1]))
        assert abs(est - true) <= 4 * se + 1e-4
