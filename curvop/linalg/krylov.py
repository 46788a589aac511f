r"""Conjugate gradients and MINRES whose tolerance means what it says.

Both solve :math:`(A + \delta I) X = B` column by column (all columns share each operator
product) and stop only when the **true** residual of every column satisfies

.. math::

    \|B_j - (A + \delta I) X_j\|_2 \le \text{rtol} \, \|B_j\|_2 ,

checked with one extra product; if the recursively updated residual has drifted from the true
one, the iteration restarts from the true residual (residual replacement). linear_operator's CG
stops on its own recurrence residual with a loose default tolerance (``cg_tolerance = 1``) and
gives relative errors near ``1e-3``; here a result that does not meet ``rtol`` within
``max_iter`` iterations raises (or, with ``check=False``, comes back with
``converged=False``).

``cg`` needs :math:`A + \delta I` symmetric positive definite; ``minres`` only symmetric and
nonsingular (an indefinite Hessian, or a Hessian made positive definite by ``δ``). Both take
a symmetric positive definite preconditioner (see :mod:`curvop.linalg.preconditioners`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvop.errors import InputError
from curvop.linalg._common import CountedOperator, check_rhs

__all__ = ["KrylovResult", "cg", "minres"]

Matvec = Callable[[Tensor], Tensor]


@dataclass
class KrylovResult:
    """The result of :func:`cg` or :func:`minres`.

    Attributes:
        x: The solution, shaped like the right-hand side.
        converged: Whether every column met ``rtol`` (true residual).
        residual: True relative residuals ``‖b − (A + δI) x‖ / ‖b‖`` per column, `(m,)`.
        iterations: Iterations run (restarts included).
        num_products: Operator products, one per column and iteration, verifications included.
        history: Largest recurrence relative residual over the columns after each iteration.
    """

    x: Tensor
    converged: bool
    residual: Tensor
    iterations: int
    num_products: int
    history: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------- kernels
def _pcg_core(matvec: Matvec, precond: Matvec, b: Tensor, rtol: float, max_iter: int,
              where: str, what: str = "K + diag(d)", x0: Tensor | None = None,
              history: list | None = None) -> tuple[Tensor, Tensor, int]:
    """Preconditioned CG on the columns of ``b`` `(n, m)` with verified true residuals.

    Returns:
        ``(x, true relative residuals (m,), iterations)``; the caller decides what a residual
        above ``rtol`` means.

    Raises:
        InputError: If ``pᵀ M p ≤ 0`` for an unconverged column (not positive definite).
    """
    tiny = torch.finfo(b.dtype).tiny
    bnorm = b.norm(dim=0)
    target = rtol * bnorm
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x = x0.clone()
        r = b - matvec(x)
    z = precond(r)
    p, rz = z.clone(), (r * z).sum(0)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - `it` is returned
        done = r.norm(dim=0) <= target
        if bool(done.all()):
            r = b - matvec(x)
            if bool((r.norm(dim=0) <= target).all()):
                return x, r.norm(dim=0) / bnorm.clamp_min(tiny), it - 1
            z = precond(r)  # restart from the true residual
            p, rz = z.clone(), (r * z).sum(0)
            done = r.norm(dim=0) <= target
        Ap = matvec(p)
        pAp = (p * Ap).sum(0)
        if bool(((pAp <= 0) & ~done).any()):
            raise InputError(f"{where}: {what} is not positive definite (pᵀMp ≤ 0 in CG)")
        alpha = torch.where(done, torch.zeros_like(rz), rz / pAp.clamp_min(tiny))
        x = x + alpha * p
        r = r - alpha * Ap
        z = precond(r)
        rz_new = (r * z).sum(0)
        beta = torch.where(done, torch.zeros_like(rz), rz_new / rz.clamp_min(tiny))
        p, rz = z + beta * p, rz_new
        if history is not None:
            history.append(float((r.norm(dim=0) / bnorm.clamp_min(tiny)).max()))
    res = (b - matvec(x)).norm(dim=0) / bnorm.clamp_min(tiny)
    return x, res, it


def _pcg(matvec: Matvec, precond: Matvec, b: Tensor, rtol: float, max_iter: int,
         where: str) -> Tensor:
    """Preconditioned CG on the columns of ``b`` `(n, m)`; the true residual is verified.

    Raises:
        InputError: if the operator is not positive definite or ``max_iter`` is exceeded.
    """
    x, res, _ = _pcg_core(matvec, precond, b, rtol, max_iter, where)
    worst = res.max()
    if bool(worst <= rtol):
        return x
    raise InputError(
        f"{where}: CG reached relative residual {float(worst):.3g} > rtol={rtol:g} after "
        f"max_iter={max_iter} iterations; raise `max_iter` or `rtol`, or add more damping"
    )


def _pminres_core(matvec: Matvec, precond: Matvec, b: Tensor, rtol: float, max_iter: int,
                  where: str, x0: Tensor | None = None, history: list | None = None
                  ) -> tuple[Tensor, Tensor, int]:
    """Preconditioned MINRES (Paige–Saunders) on the columns of ``b`` `(n, m)`.

    Besides the recurrences of scipy's ``minres`` it updates the 2-norm residual
    ``r ← r − φ A w`` (three more vectors per column), stops when that meets ``rtol`` and
    verifies it with a true residual, restarting from it when they disagree.

    Returns:
        ``(x, true relative residuals (m,), iterations)``.

    Raises:
        InputError: If the preconditioner is not positive definite.
    """
    dt = b.dtype
    eps, tiny = torch.finfo(dt).eps, torch.finfo(dt).tiny
    bnorm = b.norm(dim=0)
    target = rtol * bnorm
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r_true = b.clone() if x0 is None else b - matvec(x)
    it = 0
    while True:
        active = r_true.norm(dim=0) > target
        if not bool(active.any()) or it >= max_iter:
            break
        # ---- one MINRES cycle on the correction, from the true residual
        r1 = r_true.clone()
        y = precond(r1)
        beta1 = (r1 * y).sum(0)
        if bool((beta1 < 0).any()):
            raise InputError(f"{where}: the preconditioner is not positive definite")
        beta1 = beta1.clamp_min(0).sqrt()
        active = active & (beta1 > 0)
        zeros = torch.zeros_like(beta1)
        oldb, beta, dbar, epsln = zeros, beta1, zeros, zeros
        phibar = beta1
        cs, sn = -torch.ones_like(beta1), zeros
        w = torch.zeros_like(b)
        w2 = torch.zeros_like(b)
        Aw = torch.zeros_like(b)
        Aw2 = torch.zeros_like(b)
        r2 = r1
        r = r_true.clone()  # 2-norm residual, updated by recurrence
        first = True
        while it < max_iter:
            it += 1
            s = torch.where(active, 1.0 / beta.clamp_min(tiny), zeros)
            v = s * y
            Av = matvec(v)
            yy = Av
            if not first:
                yy = yy - torch.where(active, beta / oldb.clamp_min(tiny), zeros) * r1
            alfa = (v * yy).sum(0)
            yy = yy - torch.where(active, alfa / beta.clamp_min(tiny), zeros) * r2
            r1, r2 = r2, yy
            y = precond(r2)
            oldb = beta
            beta2 = (r2 * y).sum(0)
            if bool(((beta2 < 0) & active).any()):
                raise InputError(f"{where}: the preconditioner is not positive definite")
            beta = beta2.clamp_min(0).sqrt()
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar = -cs * beta
            gamma = torch.hypot(gbar, beta).clamp_min(eps)
            cs, sn = gbar / gamma, beta / gamma
            phi = cs * phibar
            phibar = sn * phibar
            w1, w2 = w2, w
            Aw1, Aw2 = Aw2, Aw
            w = (v - oldeps * w1 - delta * w2) / gamma
            Aw = (Av - oldeps * Aw1 - delta * Aw2) / gamma
            step = torch.where(active, phi, zeros)
            x = x + step * w
            r = r - step * Aw
            first = False
            rn = r.norm(dim=0)
            if history is not None:
                history.append(float((rn / bnorm.clamp_min(tiny)).max()))
            active = active & (rn > target) & (beta > 0)
            if not bool(active.any()):
                break
        r_true = b - matvec(x)
        if bool((r_true.norm(dim=0) <= target).all()):
            break
    res = r_true.norm(dim=0) / bnorm.clamp_min(tiny)
    return x, res, it


# ---------------------------------------------------------------------------- public solvers
def _setup(op, rhs, delta, precond, size):
    from curvop.linalg.preconditioners import as_preconditioner

    A = CountedOperator(op, delta, size)
    B, back = check_rhs(rhs, A.size, rhs.dtype, rhs.device, "rhs")
    pre = as_preconditioner(precond, A.size)
    return A, B, back, pre


def _finish(name, A, x, res, it, rtol, max_iter, back, check, history) -> KrylovResult:
    converged = bool((res <= rtol).all())
    if check and not converged:
        raise InputError(
            f"{name}: reached relative residual {float(res.max()):.3g} > rtol={rtol:g} after "
            f"max_iter={max_iter} iterations ({A.num_products} products); raise `max_iter`, "
            "use a preconditioner or add damping")
    return KrylovResult(back(x), converged, res, it, A.num_products, history)


def cg(op, rhs: Tensor, *, delta: float = 0.0, rtol: float = 1e-6, max_iter: int = 1000,
       precond=None, x0: Tensor | None = None, check: bool = True,
       size: int | None = None) -> KrylovResult:
    r"""Preconditioned conjugate gradients for :math:`(A + \delta I) X = B`, true residual checked.

    Args:
        op: :math:`A`: a symmetric `(P, P)` ``LinearOperator`` or tensor, or a callable on
            `(P, m)` blocks (then pass ``size``).
        rhs: :math:`B`, `(P,)` or `(P, m)`; the iteration runs in its dtype.
        delta: The shift :math:`\delta`; :math:`A + \delta I` must be positive definite.
        rtol: Relative residual every column must meet (true residual, see the module
            docstring).
        max_iter: Iteration limit.
        precond: ``None``; a tensor `(P,)` (a diagonal approximating :math:`A + \delta I`); a
            ``LinearOperator`` with a ``solve`` (e.g. ``Kron.damped(δ)``); an object with
            ``solve(R)``; or a callable ``R ↦ M⁻¹ R`` on `(P, m)` blocks. Must be symmetric
            positive definite.
        x0: Starting guess (default zero).
        check: Raise if ``rtol`` is not met (else return with ``converged=False``).
        size: `P` when ``op`` is a callable.

    Returns:
        A :class:`KrylovResult`; ``x`` shaped like ``rhs``.

    Raises:
        InputError: If ``rhs`` is malformed, :math:`A + \delta I` is found not positive
            definite, or (``check=True``) ``rtol`` is not met within ``max_iter``.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> res = cg(A, torch.ones(5, dtype=torch.float64), delta=1.0, rtol=1e-12)
        >>> res.converged, bool(torch.allclose(res.x, 1 / torch.arange(2.0, 7.0).double()))
        (True, True)
    """
    _check_tol(rtol, max_iter)
    A, B, back, pre = _setup(op, rhs, delta, precond, size)
    x0m = None if x0 is None else check_rhs(x0, A.size, B.dtype, B.device, "x0")[0]
    history: list[float] = []
    x, res, it = _pcg_core(A, pre, B, rtol, max_iter, "cg", "A + δI", x0m, history)
    return _finish("cg", A, x, res, it, rtol, max_iter, back, check, history)


def minres(op, rhs: Tensor, *, delta: float = 0.0, rtol: float = 1e-6, max_iter: int = 1000,
           precond=None, x0: Tensor | None = None, check: bool = True,
           size: int | None = None) -> KrylovResult:
    r"""Preconditioned MINRES for symmetric, possibly indefinite :math:`(A + \delta I) X = B`.

    Minimises the residual over the Krylov space, so it needs only a symmetric nonsingular
    :math:`A + \delta I` (e.g. an indefinite Hessian); the preconditioner must be symmetric
    positive definite. Arguments, result and stopping rule are those of :func:`cg`.

    Args:
        op: :math:`A`: a symmetric `(P, P)` ``LinearOperator`` or tensor, or a callable on
            `(P, m)` blocks (then pass ``size``).
        rhs: :math:`B`, `(P,)` or `(P, m)`; the iteration runs in its dtype.
        delta: The shift :math:`\delta`; :math:`A + \delta I` must be nonsingular.
        rtol: Relative residual every column must meet (true residual).
        max_iter: Iteration limit.
        precond: A symmetric positive definite preconditioner (see :func:`cg`).
        x0: Starting guess (default zero).
        check: Raise if ``rtol`` is not met (else return with ``converged=False``).
        size: `P` when ``op`` is a callable.

    Returns:
        A :class:`KrylovResult`; ``x`` shaped like ``rhs``.

    Raises:
        InputError: If ``rhs`` is malformed, the preconditioner is not positive definite, or
            (``check=True``) ``rtol`` is not met within ``max_iter``.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([-2.0, -1.0, 1.0, 3.0], dtype=torch.float64))
        >>> res = minres(A, torch.ones(4, dtype=torch.float64), rtol=1e-12)
        >>> res.converged, [round(v, 6) for v in res.x.tolist()]
        (True, [-0.5, -1.0, 1.0, 0.333333])
    """
    _check_tol(rtol, max_iter)
    A, B, back, pre = _setup(op, rhs, delta, precond, size)
    x0m = None if x0 is None else check_rhs(x0, A.size, B.dtype, B.device, "x0")[0]
    history: list[float] = []
    x, res, it = _pminres_core(A, pre, B, rtol, max_iter, "minres", x0m, history)
    return _finish("minres", A, x, res, it, rtol, max_iter, back, check, history)


def _check_tol(rtol: float, max_iter: int) -> None:
    if not (0 < rtol < 1):
        raise InputError(f"`rtol` must be in (0, 1); got {rtol}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise InputError(f"`max_iter` must be an integer ≥ 1; got {max_iter!r}")
