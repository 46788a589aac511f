"""Stochastic Lanczos spectral density and the PNG plot helper."""

from __future__ import annotations

import sys

import pytest
import torch

from curvop.errors import InputError
from curvop.linalg import factorize, plot_spectrum, spectral_density

F64 = torch.float64


def _two_clusters():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=F64))
    lam = torch.cat([1 + 0.1 * torch.rand(60, generator=g, dtype=F64),
                     10 + torch.rand(20, generator=g, dtype=F64)])
    return Q @ torch.diag(lam) @ Q.T, lam


def test_density_puts_the_mass_where_the_eigenvalues_are():
    A, lam = _two_clusters()
    sd = spectral_density(A, num_probes=40, num_steps=30, sigma=0.2)
    assert sd.density.shape == sd.grid.shape and sd.num_products == 40 * 30
    total = torch.trapezoid(sd.density, sd.grid)
    assert abs(float(total) - 1) < 1e-6
    low = sd.grid < 5
    mass_low = torch.trapezoid(sd.density[low], sd.grid[low])
    assert abs(float(mass_low) - 0.75) < 0.08  # 60 of 80 eigenvalues
    # the density is callable and the extreme Ritz values match the extreme eigenvalues
    assert float(sd(torch.tensor([5.5]))) < 1e-3
    assert abs(float(sd.nodes.max()) - float(lam.max())) < 1e-6


def test_plot_writes_a_png(tmp_path):
    A, lam = _two_clusters()
    sd = spectral_density(A, num_probes=8, num_steps=20)
    for name, kwargs in [("both.png", dict(density=sd, eigenvalues=lam)),
                         ("density.png", dict(density=sd)),
                         ("exact.png", dict(eigenvalues=factorize(A).eigenvalues, logy=False,
                                            title="exact"))]:
        path = plot_spectrum(tmp_path / name, **kwargs)
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(InputError, match="density` or `eigenvalues"):
        plot_spectrum(tmp_path / "none.png")


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="plot_spectrum needs matplotlib"):
        plot_spectrum(tmp_path / "x.png", eigenvalues=torch.ones(3, dtype=F64))
