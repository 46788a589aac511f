r"""Top eigenpairs of a symmetric operator and the low-rank operator they define.

``top_eigenpairs`` runs scipy's implicitly restarted Lanczos (ARPACK ``eigsh``) on products of
any ``LinearOperator`` — on its own device, only vectors cross to the host — rather than
linear_operator's Lanczos, whose fixed number of steps gives no accuracy guarantee.

``low_rank_operator`` returns :math:`U \mathrm{diag}(\lambda) U^\top` as linear_operator's
``LowRankRootLinearOperator``; adding :math:`\delta I` gives its
``LowRankRootAddedDiagLinearOperator``, whose solve (Woodbury) and log-determinant (matrix
determinant lemma) are exact.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg
import torch
from linear_operator.operators import LinearOperator, LowRankRootLinearOperator
from torch import Tensor

from curvop import _checks
from curvop.errors import InputError
from curvop.interop.scipy import to_scipy

__all__ = ["top_eigenpairs", "low_rank_operator"]


def top_eigenpairs(op: LinearOperator, k: int, tol: float = 1e-8, maxiter: int | None = None
                   ) -> tuple[Tensor, Tensor]:
    """The ``k`` largest algebraic eigenpairs of a symmetric `(P, P)` operator.

    Args:
        op: The operator.
        k: Number of eigenpairs (``k < P``; for ``k >= P`` the dense eigendecomposition).
        tol: Relative accuracy of the eigenvalues.
        maxiter: ARPACK iteration limit (default ``10 P``).

    Returns:
        ``(U (P, k), lam (k,))`` on ``op``'s device and dtype, ``lam`` descending.

    Raises:
        InputError: If ``k`` is not positive or ARPACK does not converge.
    """
    k = _checks.check_positive_int(k, "low_rank")
    P = op.shape[-1]
    if k >= P - 1:  # ARPACK needs k < P - 1; a tiny problem is solved densely
        lam, U = torch.linalg.eigh(op.to_dense())
        return U.flip(-1)[:, :k], lam.flip(-1)[:k]
    ncv = min(P, max(2 * k + 1, 20))
    v0 = np.random.default_rng(0).standard_normal(P)
    try:
        lam, U = scipy.sparse.linalg.eigsh(to_scipy(op), k=k, which="LA", tol=tol, ncv=ncv,
                                           maxiter=maxiter, v0=v0)
    except scipy.sparse.linalg.ArpackNoConvergence as err:
        raise InputError(f"eig_lowrank did not converge to tol={tol} in the iteration limit; "
                         "raise `maxiter` or `tol`") from err
    order = np.argsort(lam)[::-1]
    U = torch.as_tensor(np.ascontiguousarray(U[:, order]), device=op.device).to(op.dtype)
    lam = torch.as_tensor(lam[order].copy(), device=op.device).to(op.dtype)
    return U, lam


def low_rank_operator(eigenvectors: Tensor, eigenvalues: Tensor) -> LowRankRootLinearOperator:
    """``U diag(λ) Uᵀ`` as a lazy operator (``λ >= 0``).

    Adding ``δI`` gives an operator whose solve and log-determinant are exact.

    Raises:
        InputError: On mismatched shapes or negative eigenvalues.
    """
    if eigenvectors.dim() != 2 or eigenvalues.shape != (eigenvectors.shape[1],):
        raise InputError(f"`eigenvectors` (P, k) and `eigenvalues` (k,) must match; got "
                         f"{tuple(eigenvectors.shape)} and {tuple(eigenvalues.shape)}")
    if (eigenvalues < 0).any():
        raise InputError("`eigenvalues` must be non-negative for a low-rank curvature")
    return LowRankRootLinearOperator(eigenvectors * eigenvalues.sqrt())
