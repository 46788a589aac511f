"""Data-set operators (streamed batches) and eig_lowrank against dense references."""

from __future__ import annotations

import pytest
import torch

import curvop
from curvop.linalg import low_rank_operator

import reference as ref
from cases import Case, register


def _problem(likelihood="classification", n=36, batch=12, seed=0):
    torch.manual_seed(seed)
    model = register(torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                         torch.nn.Linear(7, 3)).double())
    X = torch.randn(n, 5, dtype=torch.float64)
    Y = (torch.randint(0, 3, (n,)) if likelihood == "classification"
         else torch.randn(n, 3, dtype=torch.float64))
    loader = [(X[i: i + batch], Y[i: i + batch]) for i in range(0, n, batch)]
    return model, X, Y, loader


KINDS = {"ggn": curvop.TorchGGN, "ef": curvop.TorchEF, "hessian": curvop.TorchHessian}


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_dataset_operator_is_sum_of_batches(kind, likelihood, cache):
    model, X, Y, loader = _problem(likelihood)
    iface = KINDS[kind](model, likelihood)
    H = sum(ref.CURVATURES[kind](model, x, y, likelihood) for x, y in loader)
    op = iface.dataset_operator(loader, cache=cache)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    tol = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(op @ V, H @ V, **tol)
    torch.testing.assert_close(op.to_dense(), H, **tol)
    torch.testing.assert_close(op.diagonal(), H.diagonal(), **tol)
    torch.testing.assert_close(op.loss, ref.loss(model, X, Y, likelihood))


def test_dataset_mc_fisher_fixed_across_passes_without_cache():
    model, X, Y, loader = _problem()
    iface = curvop.TorchGGN(model, "classification", stochastic=True,
                            generator=torch.Generator().manual_seed(0))
    op = iface.dataset_operator(loader, cache=False)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ v, op @ v, rtol=0, atol=0)


def test_loader_that_changes_raises():
    model, X, Y, loader = _problem()

    class Shuffling:
        passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(loader if self.passes == 1 else loader[::-1])

    op = curvop.TorchGGN(model, "classification").dataset_operator(Shuffling())
    with pytest.raises(ValueError, match="yielded different data at batch 0"):
        op @ torch.randn(op.shape[0], dtype=torch.float64)
    with pytest.raises(ValueError, match="yielded no batch"):
        curvop.TorchGGN(model, "classification").dataset_operator([])
    with pytest.raises(TypeError, match=r"must yield \(x, y\) pairs"):
        curvop.TorchGGN(model, "classification").dataset_operator([X[:3]])


def _subspace_sin(U, V):
    """Largest sine of the principal angles between the column spaces of U and V."""
    s = torch.linalg.svdvals(U.T @ V)
    return float((1 - s.min() ** 2).clamp_min(0).sqrt())


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_eig_lowrank_matches_dense(kind, k):
    model, X, Y, loader = _problem()
    cls = KINDS[kind]
    iface = cls(model, "classification", low_rank=k)
    H = sum(ref.CURVATURES[kind](model, x, y, "classification") for x, y in loader)
    lam_ref, U_ref = torch.linalg.eigh(H)
    lam_ref, U_ref = lam_ref.flip(0)[:k], U_ref.flip(1)[:, :k]
    U, lam, loss = iface.eig_lowrank(loader)
    assert U.shape == (H.shape[0], k) and lam.shape == (k,)
    assert (lam[:-1] >= lam[1:]).all()
    torch.testing.assert_close(lam, lam_ref, rtol=1e-8, atol=0)
    signs = torch.sign((U * U_ref).sum(0))
    torch.testing.assert_close(U * signs, U_ref, rtol=0, atol=1e-6)
    assert _subspace_sin(U, U_ref) < 1e-6
    torch.testing.assert_close(loss, ref.loss(model, X, Y, "classification"))


def test_eig_lowrank_drops_small_and_negative_eigenvalues():
    # a linear regression model: the GGN has rank <= inputs + 1 per output
    model = register(torch.nn.Linear(2, 1).double())
    X = torch.randn(10, 2, dtype=torch.float64)
    Y = torch.randn(10, 1, dtype=torch.float64)
    U, lam, _ = curvop.TorchGGN(model, "regression", low_rank=3).eig_lowrank([(X, Y)])
    assert lam.numel() == 3 and (lam > 1e-6).all()
    model2, X2, Y2, loader = _problem()
    U, lam, _ = curvop.TorchHessian(model2, "classification", low_rank=12).eig_lowrank(loader)
    assert (lam > 1e-6).all() and lam.numel() <= 12


def test_eig_lowrank_needs_low_rank():
    model, X, Y, loader = _problem()
    with pytest.raises(NotImplementedError, match="TorchEF has no `low_rank`"):
        curvop.TorchEF(model, "classification").eig_lowrank(loader)


@pytest.mark.parametrize("delta", [1e-3, 0.5, 10.0])
def test_low_rank_plus_damping_exact(delta):
    model, X, Y, loader = _problem()
    U, lam, _ = curvop.TorchGGN(model, "classification", low_rank=5).eig_lowrank(loader)
    A = low_rank_operator(U, lam).add_diagonal(torch.tensor(delta, dtype=torch.float64))
    D = U @ torch.diag(lam) @ U.T + delta * torch.eye(U.shape[0], dtype=torch.float64)
    b = torch.randn(U.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(A.solve(b), torch.linalg.solve(D, b), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(A.logdet(), torch.logdet(D), rtol=1e-10, atol=1e-10)


def test_low_rank_operator_errors():
    with pytest.raises(ValueError, match="must match"):
        low_rank_operator(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="non-negative"):
        low_rank_operator(torch.zeros(4, 1), -torch.ones(1))


def test_case_models_eig_lowrank_cnn(monkeypatch):
    from curvop.linalg.dual import DataSpaceDual

    def no_taps(self):
        raise AssertionError("auto route tried the closed-form Gram on a CNN")

    monkeypatch.setattr(DataSpaceDual, "_tap_gram", no_taps)  # convolutions: straight to Lanczos
    model, x, y = Case("cnn", "classification").build()
    loader = [(x[:3], y[:3]), (x[3:], y[3:])]
    iface = curvop.TorchGGN(model, "classification", low_rank=3)
    H = sum(ref.ggn(model, a, b, "classification") for a, b in loader)
    _, lam, _ = iface.eig_lowrank(loader)
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(H).flip(0)[:3], rtol=1e-8, atol=0)


def test_asdl_hessian_eig_lowrank():
    model, X, Y, loader = _problem()
    H = sum(ref.hessian(model, x, y, "classification") for x, y in loader)
    U, lam, loss = curvop.AsdlHessian(model, "classification", low_rank=4).eig_lowrank(loader)
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(H).flip(0)[:4], rtol=1e-8, atol=0)


@pytest.fixture(scope="module")
def wide_problem():
    """Linear-Tanh-Linear with P = 683 > R = n (C - 1) = 520: the Gram route's Lanczos.

    Returns ``(model, loader, G, eigenvalues descending, eigenvectors)``.
    """
    torch.manual_seed(1)
    model = register(torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.Tanh(),
                                         torch.nn.Linear(20, 3)).double())
    X = torch.randn(260, 30, dtype=torch.float64)
    Y = torch.randint(0, 3, (260,))
    loader = [(X[:130], Y[:130]), (X[130:], Y[130:])]
    G = sum(ref.ggn(model, x, y, "classification") for x, y in loader)
    lam, U = torch.linalg.eigh(G)
    return model, loader, G, lam.flip(0), U.flip(1)


@pytest.mark.parametrize(("method", "k"), [("auto", 1), ("auto", 10), ("dual", 10),
                                           ("lanczos", 3)])
def test_top_eigenpairs_routes_match_dense(wide_problem, method, k, monkeypatch):
    from curvop.linalg import eigen
    from curvop.linalg.dual import DataSpaceDual

    grams = []
    tap_gram = DataSpaceDual._tap_gram
    monkeypatch.setattr(DataSpaceDual, "_tap_gram",
                        lambda self: grams.append(1) or tap_gram(self))
    model, loader, G, lam_ref, U_ref = wide_problem
    lam_ref, U_ref = lam_ref[:k], U_ref[:, :k]
    op = curvop.TorchGGN(model, "classification").dataset_operator(loader)
    assert DataSpaceDual(op).num_rows == 520 > eigen._DENSE_GRAM_ROWS
    U, lam = eigen.top_eigenpairs(op, k, method=method)
    assert len(grams) == (0 if method == "lanczos" else 1)  # auto: the closed-form dual
    torch.testing.assert_close(lam, lam_ref, rtol=1e-8, atol=0)
    signs = torch.sign((U * U_ref).sum(0))
    torch.testing.assert_close(U * signs, U_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(U.T @ U, torch.eye(k, dtype=U.dtype), rtol=0, atol=1e-10)
    torch.testing.assert_close(G @ U, U * lam, rtol=0, atol=1e-8 * float(lam[0]))


def test_top_eigenpairs_dual_falls_back_below_rank():
    from curvop.linalg import eigen

    # regression with one output on 4 points: G has rank <= 4 < k
    torch.manual_seed(0)
    model = register(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                         torch.nn.Linear(4, 1)).double())
    X, Y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    iface = curvop.TorchGGN(model, "regression")
    G = ref.ggn(model, X, Y, "regression")
    op = iface.dataset_operator([(X, Y)])
    U, lam = eigen.top_eigenpairs(op, 6)  # auto: Lanczos, null-space vectors for the zeros
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(G).flip(0)[:6], rtol=0, atol=1e-10)
    torch.testing.assert_close(G @ U, U * lam, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="at most R = 4 nonzero"):
        eigen.top_eigenpairs(op, 6, method="dual")
    with pytest.raises(ValueError, match="GGN, MC Fisher or EF"):
        eigen.top_eigenpairs(curvop.TorchHessian(model, "regression").dataset_operator(
            [(X, Y)]), 2, method="dual")
    with pytest.raises(ValueError, match="`method` must be one of"):
        eigen.top_eigenpairs(op, 2, method="qr")
