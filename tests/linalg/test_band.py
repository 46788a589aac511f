"""The band form W = Q B Qᵀ behind many-δ dual factorisations, against dense float64 algebra."""

import pytest
import torch

from curvop.errors import InputError
from curvop.linalg import DataSpaceDual, DualFactorization
from curvop.linalg._band import BandReduction

F64 = torch.float64


def _psd(n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, rank, dtype=F64, generator=g)
    return M @ M.mT


def _cases():
    # (W, bandwidth, tile): full rank, rank-deficient, tiles not aligned with panels, one
    # panel or none (R ≤ b + 1), R = 1, and zero rows/columns (Householder τ = 0)
    holes = torch.zeros(40, 40, dtype=F64)
    holes[::2, ::2] = _psd(20, 20, 5)
    return [
        (_psd(70, 70, 0), 8, 24),
        (_psd(70, 25, 1), 8, 24),
        (_psd(61, 61, 2), 16, 40),
        (_psd(9, 9, 3), 8, 24),
        (_psd(5, 5, 4), 96, 768),
        (_psd(1, 1, 6), 96, 768),
        (holes, 4, 12),
        (torch.zeros(12, 12, dtype=F64), 4, 8),
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
def test_band_form_gives_exact_logdets_solves_and_spectrum(case):
    W, b, tile = _cases()[case]
    n = W.shape[0]
    band = BandReduction(W.clone(), b, tile)
    assert band.bandwidth == max(1, min(b, n - 1))
    eye = torch.eye(n, dtype=F64)
    Y = torch.randn(n, 3, dtype=F64, generator=torch.Generator().manual_seed(9))
    for d in (1e-3, 0.7, 50.0):
        logdet = torch.linalg.slogdet(W + d * eye)[1]
        assert abs(band.logdet(d) - float(logdet)) <= 1e-12 * max(1.0, abs(float(logdet)))
        X, X_ref = band.solve(Y, d), torch.linalg.solve(W + d * eye, Y)
        # backward stable: norm-wise error of order eps · cond(W + δI) (up to 1e6 here)
        assert (X - X_ref).norm() <= 1e-9 * X_ref.norm()
        assert Y.abs().sum() > 0  # solve leaves its right-hand side alone
    torch.testing.assert_close(band.eigenvalues(), torch.linalg.eigvalsh(W), rtol=0,
                               atol=1e-10 * max(1.0, float(W.abs().max())))


def test_band_storage_holds_an_orthogonal_similarity():
    """Q from the stored reflectors is orthogonal and Qᵀ W Q is banded."""
    W = _psd(50, 50, 7)
    band = BandReduction(W.clone(), 6, 16)
    Q = band._apply(torch.eye(50, dtype=F64), transpose=False)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(50, dtype=F64), rtol=0, atol=1e-13)
    B = Q.mT @ W @ Q
    i, j = torch.meshgrid(torch.arange(50), torch.arange(50), indexing="ij")
    assert B[(i - j).abs() > 6].abs().max() < 1e-10
    assert B[(i - j).abs() == 6].abs().max() > 1e-3  # the band is really that wide


def test_not_positive_definite_shift_is_reported():
    W = _psd(30, 10, 8)
    band = BandReduction(W.clone(), 4, 8)
    assert band.logdet(-1.0) is None and band.solve(torch.ones(30, 1, dtype=F64), -1.0) is None


@pytest.mark.parametrize("method", ["band", "auto"])
def test_dual_factorisation_through_the_band_form(method):
    g = torch.Generator().manual_seed(11)
    M = torch.randn(130, 400, dtype=F64, generator=g)  # R = 130 > one panel of 96
    fact = DualFactorization(DataSpaceDual(M), method)
    G = M.mT @ M
    eye = torch.eye(400, dtype=F64)
    grid = torch.logspace(-2, 2, 5, dtype=F64)
    values = fact.logdet(grid)
    assert fact._band is not None and fact._W is None
    expected = torch.stack([torch.linalg.slogdet(G + float(d) * eye)[1] for d in grid])
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=1e-9)
    b = torch.randn(400, 2, dtype=F64, generator=g)
    torch.testing.assert_close(fact.solve(b, 0.3), torch.linalg.solve(G + 0.3 * eye, b),
                               rtol=1e-9, atol=1e-12)
    assert not fact._chol
    with pytest.raises(InputError, match="δ must be > 0"):
        fact.logdet(torch.tensor([0.0], dtype=F64))


def test_two_deltas_use_cholesky_and_a_grid_switches_to_the_band_form():
    M = torch.randn(20, 60, dtype=F64, generator=torch.Generator().manual_seed(12))
    fact = DualFactorization(DataSpaceDual(M), "auto")
    one = fact.logdet(torch.tensor([0.5, 2.0], dtype=F64))
    assert fact._band is None and len(fact._chol) == 2
    grid = fact.logdet(torch.tensor([0.5, 1.0, 2.0], dtype=F64))
    assert fact._band is not None
    assert not fact._chol  # the band form serves every later δ: no R x R factor kept
    torch.testing.assert_close(grid[[0, 2]], one, rtol=1e-13, atol=0)


@pytest.mark.gpu
def test_band_form_on_cuda_matches_the_cpu():
    W = _psd(150, 150, 13)
    cpu, gpu = BandReduction(W.clone(), 16, 48), BandReduction(W.cuda(), 16, 48)
    for d in (1e-2, 3.0):
        assert abs(cpu.logdet(d) - gpu.logdet(d)) <= 1e-11 * abs(cpu.logdet(d))
    Y = torch.randn(150, 2, dtype=F64)
    X = gpu.solve(Y.cuda(), 0.5)
    assert X.device.type == "cuda"
    torch.testing.assert_close(X.cpu(), cpu.solve(Y, 0.5), rtol=1e-10, atol=1e-12)
    assert gpu.eigenvalues().device.type == "cuda"
