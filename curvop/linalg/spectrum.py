r"""Eigenvalue spectra of large curvature operators: stochastic Lanczos density and a plot.

The spectral density :math:`\phi(t) = \frac{1}{P}\sum_i \delta(t - \lambda_i)` is estimated
from the Gauss quadrature of ``m`` Lanczos runs (Ghorbani, Krishnan & Xiao 2019; Lin, Saad &
Yang 2016), broadened by a Gaussian of width ``σ``:

.. math::

    \hat\phi(t) = \frac{1}{m} \sum_{i=1}^m \sum_{j=1}^k \tau_{ij}^2\,
    \mathcal{N}(t;\, \theta_{ij}, \sigma^2) .

It integrates to one; multiply by `P` for an eigenvalue count per unit. ``k`` steps resolve
about ``k`` features of the spectrum; the extreme Ritz values converge first, so the edges
(the top eigenvalues) are accurate long before the bulk.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from curvop.errors import InputError
from curvop.linalg.lanczos import stochastic_lanczos

__all__ = ["SpectralDensity", "spectral_density", "plot_spectrum"]


@dataclass
class SpectralDensity:
    r"""A smoothed eigenvalue density.

    Attributes:
        grid: Points `(g,)` where the density is evaluated.
        density: :math:`\hat\phi` on ``grid`` `(g,)` (integrates to about 1).
        nodes: Ritz values `(m, k)` of each probe.
        weights: Their Gauss weights `(m, k)`.
        sigma: The Gaussian width.
        size: `P`.
        num_products: Operator products spent.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    size: int
    num_products: int

    def __call__(self, t: Tensor) -> Tensor:
        """The density at points ``t``."""
        return _smooth(self.nodes, self.weights, t, self.sigma)


def _smooth(nodes: Tensor, weights: Tensor, t: Tensor, sigma: float) -> Tensor:
    t = t.to(nodes.dtype).reshape(-1, 1, 1)
    g = torch.exp(-0.5 * ((t - nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return (g * weights).sum(-1).mean(-1)


def spectral_density(op, *, num_probes: int = 10, num_steps: int = 80, sigma: float | None = None,
                     grid: Tensor | None = None, num_points: int = 512, seed: int | None = 0,
                     generator: torch.Generator | None = None, size: int | None = None
                     ) -> SpectralDensity:
    r"""Stochastic Lanczos quadrature estimate of the eigenvalue density of a symmetric ``op``.

    Args:
        op: A symmetric `(P, P)` ``LinearOperator`` or tensor (any sign), or a callable on
            `(P, m)` blocks (then pass ``size``).
        num_probes: Rademacher probes (Monte-Carlo accuracy of the weights).
        num_steps: Lanczos steps per probe (resolution).
        sigma: Gaussian width (default: 1% of the Ritz-value range).
        grid: Evaluation points (default ``num_points`` spanning the Ritz values ± 5σ).
        num_points: Size of the default grid.
        seed: Seed of the probes (ignored when ``generator`` is given).
        generator: A CPU ``torch.Generator`` for the probes.
        size: `P` when ``op`` is a callable.

    Returns:
        A :class:`SpectralDensity`.

    Raises:
        InputError: If ``sigma`` is not positive.
    """
    run = stochastic_lanczos(op, num_probes=num_probes, max_steps=num_steps, quad_tol=None,
                             seed=seed, generator=generator, size=size)
    live = run.weights > 0
    lo = float(run.nodes[live].min())
    hi = float(run.nodes[live].max())
    if sigma is None:
        sigma = max(0.01 * (hi - lo), 1e-12 * max(abs(lo), abs(hi), 1.0))
    if not sigma > 0:
        raise InputError(f"`sigma` must be positive; got {sigma}")
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64)
    dens = _smooth(run.nodes, run.weights, grid, sigma)
    return SpectralDensity(grid, dens, run.nodes, run.weights, float(sigma), run.size,
                           run.num_products)


def plot_spectrum(path: str | os.PathLike, density: SpectralDensity | None = None,
                  eigenvalues: Tensor | None = None, *, bins: int = 100, logy: bool = True,
                  title: str | None = None, dpi: int = 120) -> str:
    """Write a PNG of an eigenvalue spectrum: a histogram and/or a smoothed density.

    Uses matplotlib's object API (no ``pyplot`` state, no backend switch).

    Args:
        path: Where to write the PNG.
        density: A :class:`SpectralDensity` to draw as a line (scaled to counts: ``P ·`` density).
        eigenvalues: Exact eigenvalues `(n,)` to draw as a histogram.
        bins: Histogram bins.
        logy: Logarithmic count axis (spectra of curvatures span many decades).
        title: Figure title.
        dpi: Resolution.

    Returns:
        The path written, as a string.

    Raises:
        ImportError: If matplotlib is not installed (``pip install 'curvop[docs]'``).
        InputError: If neither ``density`` nor ``eigenvalues`` is given.
    """
    if density is None and eigenvalues is None:
        raise InputError("plot_spectrum needs `density` or `eigenvalues`")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plot_spectrum needs matplotlib; install it with "
                          "`pip install matplotlib` (or the extra `curvop[docs]`)") from err
    fig = Figure(figsize=(6.4, 4.0), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if eigenvalues is not None:
        ev = eigenvalues.detach().double().cpu().reshape(-1).numpy()
        ax.hist(ev, bins=bins, color="0.7", label=f"eigenvalues (n={ev.size})")
    if density is not None:
        y = (density.density * density.size).cpu().numpy()
        if eigenvalues is not None:  # counts per bin, to share the axis with the histogram
            width = (float(ev.max()) - float(ev.min())) / bins or 1.0
            y = y * width
        ax.plot(density.grid.cpu().numpy(), y, color="C0",
                label=f"SLQ density ({density.nodes.shape[0]} probes, σ={density.sigma:.3g})")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("count")
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png")
    return path
