r"""Preconditioners for :func:`~curvop.linalg.cg` and :func:`~curvop.linalg.minres`.

A preconditioner is anything with ``solve(R) -> M⁻¹ R`` for `(P, m)` blocks, ``M`` symmetric
positive definite and close to the damped curvature :math:`A + \delta I`:

* :class:`DiagonalPreconditioner` — :math:`M = \operatorname{diag}(a) + \delta I`, with ``a`` the
  exact diagonal (``interface.diag``, ``op.diagonal()``) or an estimate
  (:func:`~curvop.linalg.hutchinson_diagonal`);
* :class:`OperatorPreconditioner` — any operator with an exact ``solve``, e.g. a Kronecker
  factorisation :math:`K + \delta I` (``Kron.damped(δ)``, solved through its cached factor
  eigenbases), a low-rank-plus-damping or a diagonal ``LinearOperator``;
* :class:`NystromPreconditioner` — a randomized Nyström approximation
  :math:`\hat A = U \hat\Lambda U^\top` of rank ``ℓ`` from ``ℓ`` products (Frangella, Tropp &
  Udell 2023), :math:`P^{-1} = (\hat\lambda_\ell + \delta)\, U (\hat\Lambda + \delta I)^{-1}
  U^\top + (I - U U^\top)`. It leaves every direction outside the sketched top eigenspace
  alone — in particular the null space of a rank-deficient GGN stays one cluster at
  :math:`\delta` — and squeezes the top ``ℓ`` eigenvalues down to about
  :math:`\hat\lambda_\ell + \delta`. One sketch serves every ``δ``
  (:meth:`NystromPreconditioner.damped`).

:func:`diagonal_preconditioner`, :func:`kron_preconditioner` and :func:`nystrom_preconditioner`
build them from what the curvature interfaces return.

Which one pays off depends on the spectrum. Jacobi and KFAC rescale *every* direction, so on a
rank-deficient GGN they spread the null-space cluster at :math:`\delta` over the range of the
preconditioner and can cost more products than plain CG; Nyström saves products when a few
dozen large, spread-out eigenvalues dominate CG's count (count its ``num_products`` — the
sketch — in any comparison).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from linear_operator.operators import DiagLinearOperator, LinearOperator
from torch import Tensor

from curvop.errors import InputError, InputTypeError
from curvop.linalg._common import CountedOperator, check_positive_int

__all__ = ["DiagonalPreconditioner", "OperatorPreconditioner", "NystromPreconditioner",
           "diagonal_preconditioner", "kron_preconditioner", "nystrom_preconditioner",
           "as_preconditioner"]


class DiagonalPreconditioner:
    r""":math:`M = \operatorname{diag}(a) + \delta I` (Jacobi).

    Args:
        diag: The diagonal ``a`` `(P,)` of the undamped operator.
        delta: The damping :math:`\delta`; ``a + δ`` must be positive.

    Raises:
        InputError: If ``a + δ`` has an entry ``≤ 0`` or is not finite.
    """

    def __init__(self, diag: Tensor, delta: float = 0.0) -> None:
        if not isinstance(diag, Tensor) or diag.dim() != 1:
            raise InputError(f"`diag` must be a 1-D tensor (P,); got "
                             f"{getattr(diag, 'shape', type(diag).__name__)}")
        d = diag.detach() + float(delta)
        if not bool(torch.isfinite(d).all()) or bool((d <= 0).any()):
            raise InputError("a diagonal preconditioner needs diag + delta > 0 and finite; got "
                             f"minimum {float(d.min()):.3g}")
        self.inv = (1.0 / d).unsqueeze(-1)

    def solve(self, R: Tensor) -> Tensor:
        r""":math:`M^{-1} R = R / (a + \delta)` (row-wise) for ``R`` `(P, m)`.

        Args:
            R: Residuals `(P, m)`.

        Returns:
            `(P, m)` in ``R``'s dtype.
        """
        return self.inv.to(R.dtype) * R

    __call__ = solve


class OperatorPreconditioner:
    """``M⁻¹ R`` through an operator's exact ``solve``.

    Args:
        op: A symmetric positive definite `(P, P)` ``LinearOperator`` whose ``solve`` is exact
            and cheap (``DampedKron``, ``DiagLinearOperator``, a low-rank plus diagonal).

    Raises:
        InputTypeError: If ``op`` is not a ``LinearOperator``.
    """

    def __init__(self, op: LinearOperator) -> None:
        if not isinstance(op, LinearOperator):
            raise InputTypeError(f"`op` must be a LinearOperator; got {type(op).__name__}")
        self.op = op

    def solve(self, R: Tensor) -> Tensor:
        """``M⁻¹ R`` for ``R`` `(P, m)`, computed in the operator's dtype.

        Args:
            R: Residuals `(P, m)`.

        Returns:
            ``op.solve(R)`` `(P, m)` in ``R``'s dtype.
        """
        with torch.no_grad():
            return self.op.solve(R.to(self.op.dtype)).to(R.dtype)

    __call__ = solve


class NystromPreconditioner:
    r"""Randomized Nyström preconditioner (Frangella, Tropp & Udell 2023).

    From a Nyström approximation :math:`\hat A = U \hat\Lambda U^\top` of a positive
    semi-definite :math:`A` (`U` `(P, ℓ)` orthonormal, :math:`\hat\lambda_1 \ge \dots \ge
    \hat\lambda_\ell \ge 0`):

    .. math::

        P^{-1} = (\hat\lambda_\ell + \delta)\, U (\hat\Lambda + \delta I)^{-1} U^\top
        + (I - U U^\top) .

    Symmetric positive definite for every ``δ > -λ̂_ℓ``; the preconditioned operator maps the
    sketched top eigenvalues to about :math:`\hat\lambda_\ell + \delta` and leaves every
    direction orthogonal to ``U`` (a GGN's null space: eigenvalue :math:`\delta`) alone.
    Build it with :func:`nystrom_preconditioner`.

    Args:
        U: Orthonormal columns `(P, ℓ)`.
        eigenvalues: :math:`\hat\lambda` `(ℓ,)`, descending, non-negative.
        delta: The damping :math:`\delta`.
        num_products: Operator products the sketch cost (reported, not used).

    Attributes:
        num_products: Operator products the sketch cost (count them in comparisons).
        rank: ``ℓ``.

    Raises:
        InputError: If the shapes disagree, an eigenvalue is negative or
            :math:`\hat\lambda_\ell + \delta \le 0`.
    """

    def __init__(self, U: Tensor, eigenvalues: Tensor, delta: float = 0.0,
                 num_products: int = 0) -> None:
        if U.dim() != 2 or eigenvalues.shape != (U.shape[1],) or U.shape[1] < 1:
            raise InputError(f"`U` (P, l) and `eigenvalues` (l,) must match, l >= 1; got "
                             f"{tuple(U.shape)} and {tuple(eigenvalues.shape)}")
        if bool((eigenvalues < 0).any()):
            raise InputError("Nyström eigenvalues must be non-negative")
        self.U, self.eigenvalues = U, eigenvalues
        self.delta, self.num_products, self.rank = float(delta), int(num_products), U.shape[1]
        low = float(eigenvalues.min()) + self.delta
        if not low > 0:
            raise InputError(f"the Nyström preconditioner needs λ̂_ℓ + δ > 0; got {low:.3g}")
        # P⁻¹ R = R + U (s − 1) Uᵀ R with s = (λ̂_ℓ + δ) / (λ̂ + δ)
        self._scale = (low / (eigenvalues + self.delta) - 1.0).unsqueeze(-1)

    def damped(self, delta: float) -> NystromPreconditioner:
        r"""The same sketch at another damping (no operator products).

        Args:
            delta: The new damping :math:`\delta`.

        Returns:
            A :class:`NystromPreconditioner` sharing ``U`` and the eigenvalues.

        Raises:
            InputError: If :math:`\hat\lambda_\ell + \delta \le 0`.
        """
        return NystromPreconditioner(self.U, self.eigenvalues, delta, self.num_products)

    def solve(self, R: Tensor) -> Tensor:
        r""":math:`P^{-1} R` for ``R`` `(P, m)` (two thin products with ``U``).

        Args:
            R: Residuals `(P, m)`.

        Returns:
            `(P, m)` in ``R``'s dtype.
        """
        U = self.U.to(R.dtype)
        return R + U @ (self._scale.to(R.dtype) * (U.mT @ R))

    __call__ = solve


def nystrom_preconditioner(op, rank: int, delta: float = 0.0, *, seed: int | None = 0,
                           generator: torch.Generator | None = None,
                           size: int | None = None) -> NystromPreconditioner:
    r"""A randomized Nyström preconditioner of rank ``ℓ`` from ``ℓ`` products (one block).

    The stabilised sketch of Frangella, Tropp & Udell (2023, Alg. 2.1), in float64: an
    orthonormalised Gaussian test matrix :math:`\Omega` `(P, ℓ)`, :math:`Y = A\Omega`, a shift
    :math:`\nu = \sqrt{P}\,\varepsilon\,\|Y\|_2`, :math:`Y_\nu = Y + \nu\Omega`,
    :math:`\Omega^\top Y_\nu = C C^\top`, :math:`B = Y_\nu C^{-\top}`, :math:`B = U \Sigma V^\top`
    and :math:`\hat\Lambda = \max(\Sigma^2 - \nu I, 0)`, so that
    :math:`\hat A = U\hat\Lambda U^\top \approx Y (\Omega^\top Y)^{+} Y^\top`.

    Args:
        op: A symmetric positive semi-definite `(P, P)` ``LinearOperator`` or tensor, or a
            callable on `(P, m)` blocks (then pass ``size``).
        rank: Sketch size ``ℓ`` (the products spent).
        delta: The damping :math:`\delta` of the system to precondition (change it later
            with :meth:`NystromPreconditioner.damped`, free).
        seed: Seed of the test matrix's CPU generator (ignored when ``generator`` is given).
        generator: A CPU ``torch.Generator`` for the test matrix.
        size: `P` when ``op`` is a callable.

    Returns:
        A :class:`NystromPreconditioner` whose ``num_products`` is ``ℓ``.

    Raises:
        InputError: If ``rank`` is not in ``[1, P]`` or :math:`A` is found not positive
            semi-definite on the sketch.
        InputTypeError: If ``rank`` is not an integer.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
        >>> lam = torch.cat([torch.logspace(4, 1, 15, dtype=torch.float64),
        ...                  torch.zeros(185, dtype=torch.float64)])   # rank 15
        >>> A = Q @ torch.diag(lam) @ Q.T
        >>> pre = nystrom_preconditioner(A, 20, delta=1e-2)
        >>> torch.allclose(pre.eigenvalues[:15], lam[:15], rtol=1e-6)
        True
    """
    A = CountedOperator(op, 0.0, size)
    P = A.size
    rank = check_positive_int(rank, "rank")
    if rank > P:
        raise InputError(f"`rank` must be at most P = {P}; got {rank}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    Omega = torch.randn(rank, P, generator=generator, dtype=torch.float64).T
    Omega = torch.linalg.qr(Omega).Q.to(A.device)
    with torch.no_grad():
        Y = A(Omega).double()
    nu = math.sqrt(P) * torch.finfo(torch.float64).eps * float(torch.linalg.matrix_norm(Y, 2))
    Y = Y + nu * Omega
    core = Omega.mT @ Y
    C, info = torch.linalg.cholesky_ex((core + core.mT) / 2)
    if int(info) != 0:
        raise InputError("nystrom_preconditioner: the operator is not positive semi-definite "
                         "on the sketch (Ωᵀ A Ω has a negative eigenvalue)")
    B = torch.linalg.solve_triangular(C, Y.mT, upper=False).mT  # Y C⁻ᵀ
    U, sig, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (sig.pow(2) - nu).clamp_min(0)
    return NystromPreconditioner(U, lam, delta, A.num_products)


def diagonal_preconditioner(source, delta: float = 0.0) -> DiagonalPreconditioner:
    r"""A Jacobi preconditioner :math:`\operatorname{diag}(A) + \delta I`.

    Args:
        source: The diagonal `(P,)` (``interface.diag(x, y)[1]``, summed over batches), a
            ``DiagLinearOperator`` (``interface.diag_operator``), or any operator whose
            ``diagonal()`` is cheap (curvop's model-backed and data-set operators compute it
            exactly without `P` products for GGN/EF).
        delta: The damping :math:`\delta`.

    Returns:
        A :class:`DiagonalPreconditioner`.

    Raises:
        InputTypeError: If ``source`` is none of the above.
        InputError: If ``diag + delta`` is not positive.
    """
    if isinstance(source, Tensor):
        return DiagonalPreconditioner(source, delta)
    if isinstance(source, LinearOperator):
        with torch.no_grad():
            return DiagonalPreconditioner(source.diagonal(), delta)
    raise InputTypeError("`source` must be a diagonal tensor or a LinearOperator; got "
                         f"{type(source).__name__}")


def kron_preconditioner(kron, delta: float) -> OperatorPreconditioner:
    r"""The Kronecker-factored preconditioner :math:`K + \delta I`, solved exactly.

    Args:
        kron: A :class:`curvop.Kron` (e.g. ``interface.kron(x, y, N)[1]``, accumulated over
            batches with ``Kron.accumulate``).
        delta: The damping :math:`\delta > 0` (also per block, see ``Kron.damped``).

    Returns:
        An :class:`OperatorPreconditioner` over ``kron.damped(delta)``; each application
        rotates into the cached factor eigenbases and back (no `P × P` matrix).

    Raises:
        InputTypeError: If ``kron`` is not a Kron.
    """
    from curvop.operators.kron import _KronBase

    if not isinstance(kron, _KronBase):
        raise InputTypeError(f"`kron` must be a curvop.Kron; got {type(kron).__name__}")
    return OperatorPreconditioner(kron.damped(delta))


def as_preconditioner(precond, size: int) -> Callable[[Tensor], Tensor]:
    """Normalise the ``precond`` argument of the solvers to a callable on `(P, m)` blocks.

    Raises:
        InputTypeError: If ``precond`` is of an unsupported type.
        InputError: If it has the wrong size.
    """
    if precond is None:
        return lambda R: R
    if isinstance(precond, Tensor):
        if precond.shape != (size,):
            raise InputError(f"a diagonal `precond` must have shape ({size},); got "
                             f"{tuple(precond.shape)}")
        return DiagonalPreconditioner(precond).solve
    if isinstance(precond, DiagLinearOperator):
        return DiagonalPreconditioner(precond.diagonal()).solve
    if isinstance(precond, LinearOperator):
        if precond.shape[-1] != size:
            raise InputError(f"`precond` must be ({size}, {size}); got {tuple(precond.shape)}")
        return OperatorPreconditioner(precond).solve
    if hasattr(precond, "solve") and callable(precond.solve):
        return precond.solve
    if callable(precond):
        return precond
    raise InputTypeError("`precond` must be None, a diagonal tensor, a LinearOperator, an "
                         f"object with solve() or a callable; got {type(precond).__name__}")
