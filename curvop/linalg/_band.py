r"""Orthogonal reduction of a symmetric matrix to band form, for many shifts at the cost of one.

:math:`W = Q B Q^\top` with :math:`Q` orthogonal and :math:`B` banded (semi-bandwidth ``b``),
so that for every shift

.. math::

    \log\det(W + \delta I) = \log\det(B + \delta I), \qquad
    (W + \delta I)^{-1} = Q (B + \delta I)^{-1} Q^\top,

and a shift costs one banded Cholesky factorisation (:math:`O(R b^2)`) instead of a dense one
(:math:`\tfrac13 R^3`). The reduction is the first stage of LAPACK's two-stage eigensolvers
(``?sytrd_sy2sb``): blocked Householder QR of the panel below the band, then a symmetric rank-2b
update of the trailing matrix. It costs :math:`\tfrac43 R^3` flops, like the tridiagonalisation
inside ``eigvalsh``, but all of them in matrix-matrix products, where ``eigvalsh`` spends half of
them in memory-bound matrix-vector products (on one CPU core, R = 9000: 3.7 Cholesky
factorisations against 4.4 for ``eigvalsh``; benchmarks/results/linalg_cpu.md).

Written by hand because neither torch nor scipy exposes ``?sytrd_sy2sb``; the banded
factorisations and solves are LAPACK's (``scipy.linalg.lapack.dpbtrf`` / ``dpbtrs``).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import lapack
from torch import Tensor

__all__ = ["BandReduction"]

# Panel width: the inner dimension of the rank-2b updates is 2b (192 runs GEMM at full speed on
# one core, 128 noticeably slower); the banded factorisations cost R b² per shift.
BANDWIDTH = 96
# Tiles of the trailing matrix: the lower triangle is updated tile by tile (half the flops of a
# full update); the diagonal tiles are kept whole and symmetric.
TILE = 384


def _compact_wy(V: Tensor, tau: Tensor) -> Tensor:
    """``T`` (upper triangular) with ``H_1 ⋯ H_k = I - V T Vᵀ``, ``H_i = I - τ_i v_i v_iᵀ``.

    ``T = (I + D S)⁻¹ D`` with ``D = diag(τ)`` and ``S = striu(Vᵀ V)``: the "UT transform"
    ``T⁻¹ = D⁻¹ + S`` multiplied through by ``D``, so that a reflector with ``τ = 0`` (LAPACK's
    identity, for a column already zero below the diagonal) needs no special case.
    """
    D = torch.diag(tau)
    U = torch.triu(V.mT @ V, 1)
    U = tau.unsqueeze(1) * U
    U.diagonal().fill_(1.0)
    return torch.linalg.solve_triangular(U, D, upper=True, unitriangular=True)


def _unit_lower(a: Tensor) -> Tensor:
    """The Householder vectors of ``geqrf``'s output ``a`` `(m, k)`: below the diagonal, 1 on it."""
    V = torch.tril(a, -1)
    V.diagonal().fill_(1.0)
    return V


class BandReduction:
    r""":math:`W = Q B Q^\top` (banded :math:`B`), computed in place in ``W``.

    Args:
        W: Symmetric `(R, R)` float64 matrix; its storage is overwritten (it then holds the band
            and the Householder vectors, as LAPACK's ``?sytrd`` does).
        bandwidth: Semi-bandwidth ``b`` of :math:`B`.
        tile: Tile width of the trailing updates.

    Accuracy: backward stable (orthogonal transformations); ``logdet`` agrees with a dense
    Cholesky factorisation to about ``1e-15`` relative.
    """

    def __init__(self, W: Tensor, bandwidth: int = BANDWIDTH, tile: int = TILE) -> None:
        R = W.shape[0]
        self.size, self.device = R, W.device
        b = max(1, min(bandwidth, R - 1))
        self.bandwidth = b
        self._A = A = W
        self._panels: list[tuple[int, int, Tensor]] = []  # (column k, row s, T)
        k = 0
        while k + b < R:
            s = k + b
            a, tau = torch.geqrf(A[s:, k:k + b])
            V = _unit_lower(a[:, :tau.numel()])
            T = _compact_wy(V, tau)
            A[s:, k:k + b] = a  # R on and above the diagonal (in the band), V below it
            self._panels.append((k, s, T))
            self._two_sided(A, s, V, T, tile)
            k += b
        # lower band storage: ab[d, j] = B[j + d, j]
        self._ab = np.zeros((b + 1, R))
        for d in range(b + 1):
            self._ab[d, :R - d] = A.diagonal(-d).cpu().numpy()
        self._factors: dict[float, np.ndarray] = {}

    @staticmethod
    def _two_sided(A: Tensor, s: int, V: Tensor, T: Tensor, tile: int) -> None:
        r"""Trailing matrix :math:`A_{22} \leftarrow H^\top A_{22} H`, ``H = I - V T Vᵀ``.

        With ``Y = A₂₂ V T`` and ``Z = Y - ½ V (Tᵀ Vᵀ Y)``: :math:`A_{22} - V Z^\top - Z V^\top`,
        applied to the lower triangle tile by tile. Tiles sit at absolute multiples of ``tile``
        so that every diagonal tile stays whole and symmetric from one panel to the next.
        """
        R = A.shape[0]
        m = R - s
        X = V @ T
        bounds = [s, *range((s // tile + 1) * tile, R, tile), R]
        Y = torch.zeros(m, V.shape[1], dtype=A.dtype, device=A.device)
        for c0, c1 in zip(bounds[:-1], bounds[1:]):
            r0, r1 = c0 - s, c1 - s
            Y[r0:r1].addmm_(A[c0:c1, c0:c1], X[r0:r1])
            if c1 < R:
                L = A[c1:, c0:c1]
                Y[r1:].addmm_(L, X[r0:r1])
                Y[r0:r1].addmm_(L.mT, X[r1:])
        Z = Y - 0.5 * V @ (T.mT @ (V.mT @ Y))
        left, right = torch.cat([V, Z], 1), torch.cat([Z, V], 1)
        for c0, c1 in zip(bounds[:-1], bounds[1:]):
            r0, r1 = c0 - s, c1 - s
            A[c0:, c0:c1].addmm_(left[r0:], right[r0:r1].mT, alpha=-1)

    # ------------------------------------------------------------------ banded factorisations
    def factor(self, delta: float) -> np.ndarray | None:
        """Banded Cholesky factor of ``B + δI`` (lower band storage), or None if not PD."""
        if delta not in self._factors:
            ab = self._ab.copy()
            ab[0] += delta
            c, info = lapack.dpbtrf(ab, lower=1)
            if info != 0:
                return None
            if len(self._factors) >= 4:
                self._factors.pop(next(iter(self._factors)))
            self._factors[delta] = c
        return self._factors[delta]

    def logdet(self, delta: float) -> float | None:
        """``log det(W + δI)``, or None if ``W + δI`` is not positive definite."""
        c = self.factor(delta)
        return None if c is None else float(2.0 * np.log(c[0]).sum())

    def eigenvalues(self) -> Tensor:
        """Eigenvalues of ``W`` `(R,)`, ascending (LAPACK's banded eigensolver on ``B``)."""
        lam = scipy.linalg.eigvals_banded(self._ab, lower=True)
        return torch.from_numpy(np.sort(lam)).to(self.device)

    # ------------------------------------------------------------------ orthogonal factor
    def _apply(self, Y: Tensor, transpose: bool) -> Tensor:
        """``Qᵀ Y`` (``transpose``) or ``Q Y``, in place; ``Q = H_0 H_1 ⋯``."""
        panels = self._panels if transpose else reversed(self._panels)
        for k, s, T in panels:
            V = _unit_lower(self._A[s:, k:k + T.shape[0]])
            TT = T.mT if transpose else T
            Y[s:] -= V @ (TT @ (V.mT @ Y[s:]))
        return Y

    def solve(self, Y: Tensor, delta: float) -> Tensor | None:
        """``(W + δI)⁻¹ Y`` for ``Y`` `(R, m)` float64, or None if not positive definite."""
        c = self.factor(delta)
        if c is None:
            return None
        Z = self._apply(Y.clone(), transpose=True)
        X, info = lapack.dpbtrs(c, Z.cpu().numpy(), lower=1)
        if info != 0:  # an argument error, not a property of the matrix
            raise RuntimeError(f"dpbtrs failed with info = {info}")
        return self._apply(torch.from_numpy(X).to(self.device), transpose=False)
