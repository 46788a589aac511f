r"""Top eigenpairs of a symmetric operator and the low-rank operator they define.

``top_eigenpairs`` has two routes:

* **data-space dual** (GGN, MC Fisher, EF of one batch or summed over a loader, when the
  network is made of ``nn.Linear`` layers): the curvature is :math:`G = M^\top M` with ``R``
  rows (``R = N (C - 1)`` for classification), and its nonzero eigenpairs are those of the
  ``R × R`` Gram matrix :math:`W = M M^\top` (closed form from the layer inputs and
  backpropagated columns, see :mod:`curvop.linalg.dual`): :math:`G u = \lambda u` with
  :math:`u = M^\top v / \sqrt{\lambda}` for :math:`W v = \lambda v`. The top ``k`` of ``W``
  come from ARPACK on the small dense ``W`` in float64 to machine precision, and one
  vector-Jacobian pass gives the ``k`` vectors. Cost: about one pass with ``C`` backward
  columns for ``W`` plus one with ``k`` columns for the vectors — on the 784-256-256-10 MLP at
  batch 128 about 25–40 forward+backward passes, where Lanczos on products needs ~64 products
  plus ARPACK's own work on `P`-vectors.
* **Lanczos** (everything else: Hessians, convolutions, ...): scipy's implicitly restarted
  Lanczos (ARPACK ``eigsh``) on products of any ``LinearOperator`` — on its own device, only
  vectors cross to the host — rather than linear_operator's Lanczos, whose fixed number of
  steps gives no accuracy guarantee.

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

METHODS = ("auto", "dual", "lanczos")

DUAL_MAX_ROWS = 8192
"""Largest Gram matrix (rows ``R``) the automatic choice builds: `(R, R)` float64 is 512 MiB."""

_DENSE_GRAM_ROWS = 512
"""Gram matrices up to this size are diagonalised densely, larger ones by ARPACK."""


def top_eigenpairs(op: LinearOperator, k: int, tol: float = 1e-8, maxiter: int | None = None,
                   method: str = "auto") -> tuple[Tensor, Tensor]:
    """The ``k`` largest algebraic eigenpairs of a symmetric `(P, P)` operator.

    Accuracy: the Lanczos route stops when ARPACK's residual estimate of every Ritz pair is
    below ``tol · |λ_i|`` (default ``tol = 1e-8``; the eigenvalues are then accurate to about
    ``tol`` relative or better, in float64 arithmetic on the operator's products). The dual
    route is exact up to rounding: the eigenvalues to float64 precision of the Gram matrix,
    the vectors to the precision of the operator's dtype (``tol`` and ``maxiter`` do not apply).

    Args:
        op: The operator.
        k: Number of eigenpairs (``k < P``; for ``k >= P - 1`` the dense eigendecomposition).
        tol: Relative accuracy of the eigenvalues on the Lanczos route.
        maxiter: ARPACK iteration limit (default ``10 P``).
        method: ``'auto'`` (the data-space dual where the operator has a square-root form
            ``MᵀM`` with at most :data:`DUAL_MAX_ROWS` rows, fewer than `P`, and the Gram
            matrix comes in closed form (networks whose parameters all sit in ``nn.Linear``
            layers); Lanczos otherwise),
            ``'dual'`` (the dual, the Gram matrix from per-sample rows where there is no
            closed form) or ``'lanczos'``.

    Returns:
        ``(U (P, k), lam (k,))`` on ``op``'s device and dtype, ``lam`` descending.

    Raises:
        InputError: If ``k`` is not positive, ``method`` is unknown, ``method='dual'`` does
            not apply to ``op``, or ARPACK does not converge.
    """
    k = _checks.check_positive_int(k, "low_rank")
    if method not in METHODS:
        raise InputError(f"`method` must be one of {METHODS}; got {method!r}")
    P = op.shape[-1]
    if k >= P - 1:  # ARPACK needs k < P - 1; a tiny problem is solved densely
        lam, U = torch.linalg.eigh(op.to_dense())
        return U.flip(-1)[:, :k], lam.flip(-1)[:k]
    if method != "lanczos":
        pairs = _dual_eigenpairs(op, k, required=method == "dual")
        if pairs is not None:
            return pairs
    return _lanczos_eigenpairs(op, k, tol, maxiter)


def _lanczos_eigenpairs(op: LinearOperator, k: int, tol: float, maxiter: int | None
                        ) -> tuple[Tensor, Tensor]:
    P = op.shape[-1]
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


def _top_of_gram(W: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top ``k`` eigenpairs `(R, k)`, `(k,)` of the float64 Gram matrix, descending.

    Small ``W``: dense ``eigh``. Larger: Lanczos with full reorthogonalisation in float64 on
    ``W``'s own device, stopped when every top-``k`` Ritz residual ``β_m |s_{m,i}|`` is below
    ``1e-13 θ_1`` (eigenvalues then exact to about that, absolutely; a block method needs
    several times more reads of ``W`` here: its polynomial degree grows by one per block).
    Dense ``eigh`` if the Krylov space is exhausted first or the step limit is reached.
    """
    R = W.shape[0]

    def dense() -> tuple[Tensor, Tensor]:
        lam, V = torch.linalg.eigh(W)
        return V.flip(-1)[:, :k], lam.flip(-1)[:k]

    if R <= _DENSE_GRAM_ROWS:
        return dense()
    m_max = min(R - 1, max(300, 20 * k))
    gen = torch.Generator().manual_seed(0)
    Q = torch.empty(m_max + 1, R, dtype=W.dtype, device=W.device)  # rows: Lanczos vectors
    q = torch.randn(R, generator=gen, dtype=W.dtype).to(W.device)
    Q[0] = q / q.norm()
    alpha: list[float] = []
    beta: list[float] = []
    for j in range(m_max):
        w = W @ Q[j]
        alpha.append(float(Q[j] @ w))
        basis = Q[: j + 1]
        for _ in range(2):  # classical Gram-Schmidt, twice: orthogonal to working precision
            w -= basis.mT @ (basis @ w)
        b = float(w.norm())
        m = j + 1
        if m >= k and (m % 10 == 0 or b <= 1e-14 * abs(alpha[0]) or m == m_max):
            T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
            if m > 1:
                off = torch.tensor(beta, dtype=torch.float64)
                T += torch.diag(off, 1) + torch.diag(off, -1)
            theta, S = torch.linalg.eigh(T)
            theta, S = theta.flip(0)[:k], S.flip(1)[:, :k]
            scale = float(theta.abs().max())
            if b * float(S[-1].abs().max()) <= 1e-13 * scale:
                return Q[:m].mT @ S.to(W.device), theta.to(W.device)
            if b <= 1e-14 * scale:  # Krylov space exhausted before k pairs converged
                return dense()
        beta.append(b)
        Q[j + 1] = w / b
    return dense()


def _linear_network(op: LinearOperator) -> bool:
    """Whether every module owning trainable parameters of ``op``'s network is ``nn.Linear``.

    The closed-form Gram matrix exists only then (convolutions, embeddings, norms: per-sample
    rows instead, which cost more than Lanczos). ``True`` when the network is not at hand.
    """
    model = getattr(getattr(op, "_iface", None), "model", None)
    if model is None:
        model = getattr(getattr(getattr(op, "_batch", None), "fm", None), "module", None)
    if not isinstance(model, torch.nn.Module):
        return True
    return all(isinstance(m, torch.nn.Linear) for m in model.modules()
               if any(p.requires_grad for p in m.parameters(recurse=False)))


def _dual_eigenpairs(op: LinearOperator, k: int, required: bool
                     ) -> tuple[Tensor, Tensor] | None:
    """Top eigenpairs through the data-space Gram matrix, or ``None`` where it does not pay.

    ``None`` (Lanczos instead) when ``op`` has no square-root form, the Gram matrix has
    ``R >= P`` or more than :data:`DUAL_MAX_ROWS` rows (``auto`` only), no closed form
    (``auto`` only), or ``G`` has rank ``< k`` at working precision (a vector ``Mᵀv/√λ`` of
    a tiny ``λ`` would be inaccurate; Lanczos returns null-space vectors there).
    """
    from curvop.linalg.dual import DataSpaceDual, sqrt_form_batches

    if sqrt_form_batches(op) is None:
        if required:
            raise InputError(f"method='dual' needs a GGN, MC Fisher or EF operator (of a batch "
                             f"or a data set); got {type(op).__name__}")
        return None
    dual = DataSpaceDual(op)
    R, P = dual.num_rows, dual.size
    if not required and (R >= P or R > DUAL_MAX_ROWS):
        return None
    if k >= R:
        if required:
            raise InputError(f"method='dual': the curvature has at most R = {R} nonzero "
                             f"eigenvalues; k = {k} needs the Lanczos route")
        return None
    if not required and not _linear_network(op):
        return None  # no closed form: trying it would cost a tap pass for nothing
    W = dual.gram() if required else dual._tap_gram()
    if W is None:
        return None
    V, lam = _top_of_gram(W, k)
    eps = torch.finfo(op.dtype).eps
    if not bool(lam[-1] > eps**0.5 * lam[0].clamp_min(0)):
        if required:
            raise InputError(f"method='dual': the curvature has numerical rank < k = {k}")
        return None
    U = dual.rmatvec(V / lam.sqrt()).to(op.dtype)
    return U, lam.to(device=U.device, dtype=op.dtype)


def low_rank_operator(eigenvectors: Tensor, eigenvalues: Tensor) -> LowRankRootLinearOperator:
    """``U diag(λ) Uᵀ`` as a lazy operator (``λ >= 0``).

    Adding ``δI`` gives an operator whose solve and log-determinant are exact.

    Args:
        eigenvectors: ``U``, `(P, k)` with orthonormal columns.
        eigenvalues: ``λ``, `(k,)`, non-negative.

    Returns:
        A `(P, P)` ``LowRankRootLinearOperator`` with root ``U diag(√λ)``.

    Raises:
        InputError: On mismatched shapes or negative eigenvalues.
    """
    if eigenvectors.dim() != 2 or eigenvalues.shape != (eigenvectors.shape[1],):
        raise InputError(f"`eigenvectors` (P, k) and `eigenvalues` (k,) must match; got "
                         f"{tuple(eigenvectors.shape)} and {tuple(eigenvalues.shape)}")
    if (eigenvalues < 0).any():
        raise InputError("`eigenvalues` must be non-negative for a low-rank curvature")
    return LowRankRootLinearOperator(eigenvectors * eigenvalues.sqrt())
