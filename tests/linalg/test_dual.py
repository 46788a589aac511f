"""Exact logdet and solve of GGN/EF + δI through the data-space dual, against dense float64."""

from __future__ import annotations

import pytest
import torch

import curvop
from curvop.errors import InputError, MemoryBudgetError
from curvop.linalg import DataSpaceDual, DualFactorization, factorize

import reference as ref
from cases import register, small_cnn

F64 = torch.float64
DELTAS = [1e-2, 0.3, 5.0]


def _mlp():
    torch.manual_seed(0)
    return register(torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                        torch.nn.Linear(7, 3)).double())


def _data(likelihood, n, d_in=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g, dtype=F64)
    Y = (torch.randint(0, 3, (n,), generator=g) if likelihood == "classification"
         else torch.randn(n, 3, generator=g, dtype=F64))
    return X, Y


def _dense_logdet(H, d):
    return torch.logdet(H + d * torch.eye(H.shape[0], dtype=F64))


def _check_exact(fac, H):
    P = H.shape[0]
    for d in DELTAS:
        torch.testing.assert_close(fac.logdet(d), _dense_logdet(H, d), rtol=1e-10, atol=1e-8)
    B = torch.randn(P, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    for d in (0.05, 2.0):
        X_ref = torch.linalg.solve(H + d * torch.eye(P, dtype=F64), B)
        torch.testing.assert_close(fac.solve(B, d), X_ref, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(fac.solve(B[:, 0], d), X_ref[:, 0], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_single_batch_ggn(likelihood):
    model = _mlp()
    X, Y = _data(likelihood, 6)
    _, op = curvop.TorchGGN(model, likelihood).full_operator(X, Y)
    fac = factorize(op)
    assert fac.route == "dual" and fac.exact
    K = 2 if likelihood == "classification" else 3  # Λ of softmax has rank C - 1
    assert fac._impl.fact.num_rows == 6 * K < op.shape[0]
    _check_exact(fac, ref.ggn(model, X, Y, likelihood))


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_dataset_operator(kind, cache):
    model = _mlp()
    X, Y = _data("classification", 12)
    loader = [(X[i: i + 4], Y[i: i + 4]) for i in range(0, 12, 4)]
    iface = {"ggn": curvop.TorchGGN, "ef": curvop.TorchEF}[kind](model, "classification")
    op = iface.dataset_operator(loader, cache=cache)
    fac = factorize(op)
    assert fac.route == "dual"
    H = sum(ref.CURVATURES[kind](model, x, y, "classification") for x, y in loader)
    _check_exact(fac, H)


def test_mc_fisher_and_grid_agree_with_separate_evaluations():
    model = _mlp()
    X, Y = _data("classification", 8)
    iface = curvop.TorchGGN(model, "classification", stochastic=True, num_samples=2,
                            generator=torch.Generator().manual_seed(3))
    _, op = iface.full_operator(X, Y)
    H = op.to_dense()
    grid = torch.logspace(-3, 2, 20, dtype=F64)
    fac = factorize(op)
    values = fac.logdet(grid)  # one reduction to band form
    fact = fac._impl.fact
    assert fact._band is not None and fact._W is None and not fact._chol
    chol = factorize(op, dual="cholesky")  # one Cholesky factor per δ
    separate = torch.stack([chol.logdet(float(d)) for d in grid])
    assert chol._impl.fact._band is None
    torch.testing.assert_close(values, separate, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(values, torch.stack([_dense_logdet(H, d) for d in grid]),
                               rtol=1e-10, atol=1e-8)
    eig = factorize(op, dual="eigh")
    torch.testing.assert_close(eig.logdet(grid), separate, rtol=1e-12, atol=1e-9)
    # solves after the grid use the band form (no Cholesky factor), and agree with the
    # Cholesky and eigendecomposition ones
    b = torch.randn(op.shape[0], dtype=F64)
    x = fac.solve(b, 0.1)
    assert not fact._chol
    torch.testing.assert_close(x, chol.solve(b, 0.1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x, eig.solve(b, 0.1), rtol=1e-9, atol=1e-12)
    # the spectrum from the band form, and the Gram matrix rebuilt on request
    torch.testing.assert_close(fac.eigenvalues, eig.eigenvalues, rtol=0, atol=1e-10)
    torch.testing.assert_close(fact.W, chol._impl.fact.W, rtol=0, atol=0)


def test_closed_form_gram_equals_per_sample_rows_and_panels():
    model = _mlp()
    X, Y = _data("classification", 10)
    _, op = curvop.TorchGGN(model, "classification").full_operator(X, Y)
    dual = DataSpaceDual(op)
    W_tap = dual._tap_gram()
    assert W_tap is not None
    # a budget of a few rows forces many panels in the per-sample route
    small = DataSpaceDual(op, memory_budget=3 * op.shape[0] * 8)
    W_rows = small._row_gram()
    assert len(small._row_blocks()) > 3
    torch.testing.assert_close(W_tap, W_rows, rtol=1e-12, atol=1e-12)
    M = torch.stack([row for n in range(10) for row in
                     (dual._S[0][n].T @ ref.jacobians(model, X[n: n + 1])[0][0])])
    torch.testing.assert_close(W_tap, M @ M.T, rtol=1e-10, atol=1e-12)


def test_generic_rows_for_convolutions_and_subnetworks():
    torch.manual_seed(0)
    model = register(small_cnn(16, 3).double())
    X, Y = _data("classification", 5, d_in=16)
    _, op = curvop.TorchGGN(model, "classification").full_operator(X, Y)
    fac = factorize(op)
    assert fac.route == "dual" and fac._impl.fact.dual._tap_gram() is None
    _check_exact(fac, ref.ggn(model, X, Y, "classification"))

    mlp = _mlp()
    idx = torch.tensor([3, 40, 7, 12, 50, 60, 1, 33, 21, 44, 9, 10, 58, 2, 30, 31, 14])
    Xs, Ys = _data("regression", 4)
    _, op = curvop.TorchGGN(mlp, "regression", subnetwork_indices=idx).full_operator(Xs, Ys)
    fac = factorize(op)
    assert fac.route == "dual" and fac._impl.fact.num_rows == 12 < 17
    _check_exact(fac, ref.ggn(mlp, Xs, Ys, "regression")[idx][:, idx])


def test_more_rows_than_parameters_goes_dense_or_dual_on_request():
    model = _mlp()
    X, Y = _data("regression", 30)  # R = 90 > P = 66
    _, op = curvop.TorchGGN(model, "regression").full_operator(X, Y)
    H = ref.ggn(model, X, Y, "regression")
    assert factorize(op).route == "dense"
    _check_exact(factorize(op), H)
    forced = factorize(op, method="dual")
    assert forced.route == "dual"
    _check_exact(forced, H)


def test_refinement_and_errors():
    model = _mlp()
    X, Y = _data("classification", 6)
    _, op = curvop.TorchGGN(model, "classification").full_operator(X, Y)
    H = ref.ggn(model, X, Y, "classification")
    b = torch.randn(op.shape[0], dtype=F64)
    d = 1e-7
    x_ref = torch.linalg.solve(H + d * torch.eye(op.shape[0], dtype=F64), b)
    A = H + d * torch.eye(op.shape[0], dtype=F64)
    x0, x1 = factorize(op).solve(b, d), factorize(op, refine=1).solve(b, d)
    # a refinement step lowers the residual; the error against the (itself inexact) dense
    # solve stays at the level that the conditioning (~|H| / 1e-7) allows
    res0, res1 = ((A @ x - b).norm() / b.norm() for x in (x0, x1))
    assert res1 <= res0
    assert (x1 - x_ref).norm() / x_ref.norm() < 1e-8
    fac = factorize(op)
    with pytest.raises(InputError, match="δ must be > 0"):
        fac.logdet(0.0)
    with pytest.raises(InputError, match="rhs` must have shape"):
        fac.solve(torch.ones(3, dtype=F64), 1.0)
    with pytest.raises(InputError, match="single number"):
        fac.solve(b, [1.0, 2.0])
    with pytest.raises(InputError, match="method"):
        DualFactorization(DataSpaceDual(op), method="qr")
    with pytest.raises(InputError, match="no square-root form"):
        DataSpaceDual(curvop.TorchHessian(model, "classification").full_operator(X, Y)[1])
    with pytest.raises(MemoryBudgetError, match="data-space Gram"):
        import curvop._checks as checks
        checks_orig = checks.available_bytes
        try:
            checks.available_bytes = lambda device, fresh=False: 10
            DataSpaceDual(op).gram()
        finally:
            checks.available_bytes = checks_orig


def test_last_layer_and_float32():
    model = _mlp()
    X, Y = _data("classification", 4)
    _, op = curvop.TorchGGN(model, "classification", last_layer=True).full_operator(X, Y)
    fac = factorize(op)
    assert fac.route == "dual" and fac._impl.fact.num_rows == 8 < op.shape[0] == 24
    _check_exact(fac, ref.ggn(model, X, Y, "classification", last_layer=True))
    m32 = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    m32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    register(m32)
    _, op32 = curvop.TorchGGN(m32, "classification").full_operator(X.float(), Y)
    H = ref.ggn(model, X, Y, "classification")
    fac32 = factorize(op32)
    assert fac32.route == "dual"
    val = fac32.logdet(0.3)
    assert val.dtype == F64  # log-determinants come back in float64 (large sums need it)
    torch.testing.assert_close(val, _dense_logdet(H, 0.3), rtol=1e-5, atol=1e-4)
    b = torch.randn(op32.shape[0])
    x = fac32.solve(b, 0.3)
    assert x.dtype == torch.float32
    x_ref = torch.linalg.solve(H + 0.3 * torch.eye(H.shape[0], dtype=F64), b.double())
    torch.testing.assert_close(x.double(), x_ref, rtol=1e-4, atol=1e-5)
