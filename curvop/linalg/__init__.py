"""Linear algebra on curvature operators that linear_operator, torch and scipy lack.

* exact ``log det`` and solves of ``A + δI`` for many ``δ``: :func:`factorize`,
  :func:`logdet`, :func:`solve` (data-space dual for GGN/EF, Kronecker eigenbases, diagonal,
  low rank; stochastic Lanczos quadrature otherwise);
* Krylov solvers whose tolerance is a checked true residual: :func:`cg`, :func:`minres`, with
  diagonal, Kronecker and randomized Nyström preconditioners;
* estimators with standard errors: :func:`hutchinson_trace`, :func:`hutchinson_diagonal`,
  :func:`slq_logdet`;
* spectra: :func:`top_eigenpairs`, :func:`spectral_density`, :func:`plot_spectrum`.
"""

from curvop.linalg._common import Estimate
from curvop.linalg.damped import DampedCurvature, DampedOperator, factorize, logdet, solve
from curvop.linalg.dual import DataSpaceDual, DualFactorization
from curvop.linalg.eigen import low_rank_operator, top_eigenpairs
from curvop.linalg.estimators import hutchinson_diagonal, hutchinson_trace
from curvop.linalg.krylov import KrylovResult, cg, minres
from curvop.linalg.lanczos import LanczosQuadrature, SLQEstimate, slq_logdet, stochastic_lanczos
from curvop.linalg.preconditioners import (
    DiagonalPreconditioner,
    NystromPreconditioner,
    OperatorPreconditioner,
    diagonal_preconditioner,
    kron_preconditioner,
    nystrom_preconditioner,
)
from curvop.linalg.spectrum import SpectralDensity, plot_spectrum, spectral_density

__all__ = [
    "factorize",
    "DampedCurvature",
    "DampedOperator",
    "logdet",
    "solve",
    "DataSpaceDual",
    "DualFactorization",
    "cg",
    "minres",
    "KrylovResult",
    "DiagonalPreconditioner",
    "OperatorPreconditioner",
    "NystromPreconditioner",
    "diagonal_preconditioner",
    "kron_preconditioner",
    "nystrom_preconditioner",
    "slq_logdet",
    "stochastic_lanczos",
    "LanczosQuadrature",
    "SLQEstimate",
    "Estimate",
    "hutchinson_trace",
    "hutchinson_diagonal",
    "spectral_density",
    "SpectralDensity",
    "plot_spectrum",
    "top_eigenpairs",
    "low_rank_operator",
]
