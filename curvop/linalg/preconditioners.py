r"""Preconditioners for :func:`~curvop.linalg.cg` and :func:`~curvop.linalg.minres`.

A preconditioner is anything with ``solve(R) -> M⁻¹ R`` for `(P, m)` blocks, ``M`` symmetric
positive definite and close to the damped curvature :math:`A + \delta I`:

* :class:`DiagonalPreconditioner` — :math:`M = \operatorname{diag}(a) + \delta I`, with ``a`` the
  exact diagonal (``interface.diag``, ``op.diagonal()``) or an estimate
  (:func:`~curvop.linalg.hutchinson_diagonal`);
* :class:`OperatorPreconditioner` — any operator with an exact ``solve``, e.g. a Kronecker
  factorisation :math:`K + \delta I` (``Kron.damped(δ)``, solved through its cached factor
  eigenbases), a low-rank-plus-damping or a diagonal ``LinearOperator``.

:func:`diagonal_preconditioner` and :func:`kron_preconditioner` build them from what the
curvature interfaces return.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from linear_operator.operators import DiagLinearOperator, LinearOperator
from torch import Tensor

from curvop.errors import InputError, InputTypeError

__all__ = ["DiagonalPreconditioner", "OperatorPreconditioner", "diagonal_preconditioner",
           "kron_preconditioner", "as_preconditioner"]


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
        """``M⁻¹ R`` for ``R`` `(P, m)`."""
        return self.inv.to(R.dtype) * R

    __call__ = solve


class OperatorPreconditioner:
    """``M⁻¹ R`` through an operator's exact ``solve``.

    Args:
        op: A symmetric positive definite `(P, P)` ``LinearOperator`` whose ``solve`` is exact
            and cheap (``DampedKron``, ``DiagLinearOperator``, a low-rank plus diagonal).
    """

    def __init__(self, op: LinearOperator) -> None:
        if not isinstance(op, LinearOperator):
            raise InputTypeError(f"`op` must be a LinearOperator; got {type(op).__name__}")
        self.op = op

    def solve(self, R: Tensor) -> Tensor:
        """``M⁻¹ R`` for ``R`` `(P, m)`, computed in the operator's dtype."""
        with torch.no_grad():
            return self.op.solve(R.to(self.op.dtype)).to(R.dtype)

    __call__ = solve


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
