r"""Factorise once, answer many: ``log det`` and ``solve`` of :math:`A + \delta I` for many ``δ``.

:func:`factorize` picks the cheapest exact route for the operator's structure and keeps what a
second ``δ`` can reuse; :func:`logdet` and :func:`solve` are one-shot spellings.

Routes (``DampedCurvature.route``):

* ``'dual'`` (exact): GGN / MC Fisher / EF of a batch or a data set with ``R = NK < P``
  (:mod:`curvop.linalg.dual`), and low-rank roots ``R Rᵀ``;
* ``'kron'`` (exact): :class:`~curvop.Kron` and ``DampedKron``, through the cached factor
  eigenbases, :math:`\sum \log(\lambda_A \lambda_B + \delta)`;
* ``'diag'`` (exact): ``DiagLinearOperator``;
* ``'dense'`` (exact): tensors, ``DenseLinearOperator``, GGNs with ``R ≥ P`` that fit;
* ``'operator'`` (as the operator states): ``KronAddedDiag``, through its own ``damped(δ)``;
* ``'iterative'`` (stochastic ``logdet`` with a standard error; ``solve`` to a checked
  ``rtol``): anything else (Hessians, sums, ...), by SLQ and CG / MINRES.

A constant shift already inside the operator (``op.add_diagonal(c)``, ``op.add_jitter(c)``)
is recognised and added to ``δ``.
"""

from __future__ import annotations

import torch
from linear_operator.operators import (
    AddedDiagLinearOperator,
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    LinearOperator,
    RootLinearOperator,
)
from torch import Tensor
from torch.autograd.function import once_differentiable

from curvop import _checks
from curvop._checks import check_square_operator
from curvop.errors import InputError, NotSupportedError
from curvop.linalg._common import Estimate, as_deltas, check_rhs
from curvop.linalg.dual import DataSpaceDual, DualFactorization, sqrt_form_batches
from curvop.linalg.krylov import cg, minres
from curvop.linalg.lanczos import LanczosQuadrature, stochastic_lanczos

__all__ = ["DampedCurvature", "DampedOperator", "factorize", "logdet", "solve"]

_ROUTES = ("auto", "dual", "kron", "diag", "dense", "operator", "iterative")


# ---------------------------------------------------------------------------- exact routes
class _Diag:
    def __init__(self, d: Tensor) -> None:
        self.d = d.detach().double()

    def logdet(self, deltas: Tensor) -> Tensor:
        s = self.d.unsqueeze(0) + deltas.to(self.d.device).unsqueeze(1)
        if bool((s <= 0).any()):
            raise InputError("log det(D + δI) needs D + δI positive definite")
        return torch.log(s).sum(1).cpu()

    def solve(self, B: Tensor, delta: float) -> Tensor:
        s = self.d + delta
        if bool((s == 0).any()):
            raise InputError(f"D + δI is singular for δ = {delta:g}")
        return B.double() / s.unsqueeze(-1)


class _Dense:
    def __init__(self, A: Tensor) -> None:
        A = A.detach().double()
        self.lam, self.Q = torch.linalg.eigh((A + A.mT) / 2)

    def logdet(self, deltas: Tensor) -> Tensor:
        s = self.lam.unsqueeze(0) + deltas.to(self.lam.device).unsqueeze(1)
        if bool((s <= 0).any()):
            raise InputError(f"log det(A + δI) needs A + δI positive definite; λ_min(A) = "
                             f"{float(self.lam.min()):.4g}")
        return torch.log(s).sum(1).cpu()

    def solve(self, B: Tensor, delta: float) -> Tensor:
        s = self.lam + delta
        if bool((s == 0).any()):
            raise InputError(f"A + δI is singular for δ = {delta:g}")
        return self.Q @ ((self.Q.mT @ B.double()) / s.unsqueeze(-1))


class _Kron:
    """Kron / DampedKron: the factor eigenbases are the operator's cache (computed once)."""

    def __init__(self, op) -> None:
        self.op = op

    def logdet(self, deltas: Tensor) -> Tensor:
        spec = self.op._shifted_spectrum(torch.float64)
        dl = deltas.to(self.op.device)
        total = torch.zeros_like(dl)
        for lam, _ in spec:
            s = lam.reshape(1, -1) + dl.unsqueeze(1)
            if bool((s <= 0).any()):
                raise InputError("log det(K + δI) needs K + δI positive definite")
            total = total + torch.log(s).sum(1)
        return total.cpu()

    def solve(self, B: Tensor, delta: float) -> Tensor:
        spec = self.op._shifted_spectrum(torch.float64)
        out = []
        for (lam, Qs), p in zip(spec, torch.split(B.double(), self.op.block_sizes)):
            s = lam.reshape(-1, 1) + delta
            if bool((s == 0).any()):
                raise InputError(f"K + δI is singular for δ = {delta:g}")
            y = self.op._rotate(Qs, p, True) / s
            out.append(self.op._rotate(Qs, y, False))
        return torch.cat(out)


class _Operator:
    """Delegate to the operator's own ``damped(δ)`` (one damped operator cached per δ)."""

    def __init__(self, op) -> None:
        self.op = op
        self._cache: dict[float, LinearOperator] = {}

    def _at(self, delta: float):
        if delta not in self._cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[delta] = self.op.damped(delta) if delta else self.op
        return self._cache[delta]

    def logdet(self, deltas: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.stack([self._at(d).logdet().double().cpu() for d in deltas.tolist()])

    def solve(self, B: Tensor, delta: float) -> Tensor:
        with torch.no_grad():
            return self._at(delta).solve(B.to(self.op.dtype)).double()


class _Dual:
    def __init__(self, fact: DualFactorization, refine: int) -> None:
        self.fact, self.refine = fact, refine

    def logdet(self, deltas: Tensor) -> Tensor:
        return self.fact.logdet(deltas)

    def solve(self, B: Tensor, delta: float) -> Tensor:
        return self.fact.solve(B.double(), delta, self.refine)


class _Iterative:
    """SLQ ``logdet`` (one Lanczos run serves every δ ≥ its own) and CG / MINRES ``solve``."""

    def __init__(self, op, opts: dict) -> None:
        self.op, self.opts = op, opts
        self._run: tuple[float, LanczosQuadrature] | None = None

    def quadrature(self, dmin: float) -> LanczosQuadrature:
        if self._run is None or dmin < self._run[0]:
            o = self.opts
            self._run = (dmin, stochastic_lanczos(
                self.op, num_probes=o["num_probes"], max_steps=o["max_steps"],
                quad_tol=o["quad_tol"], seed=o["seed"], generator=o["generator"],
                fn=lambda t: torch.log((t + dmin).clamp_min(1e-300))))
        return self._run[1]

    def estimates(self, deltas: Tensor) -> list[Estimate]:
        run = self.quadrature(float(deltas.min()))
        return [run.logdet(float(d)) for d in deltas]

    def logdet(self, deltas: Tensor) -> Tensor:
        return torch.stack([e.value.double().cpu() for e in self.estimates(deltas)])

    def solve(self, B: Tensor, delta: float) -> Tensor:
        o = self.opts
        fn = minres if o["solver"] == "minres" else cg
        pre = o["precond"]
        if callable(pre) and not hasattr(pre, "solve") and not isinstance(
                pre, (Tensor, LinearOperator)):
            pre = pre(delta)  # a factory δ ↦ preconditioner
        res = fn(self.op, B.double(), delta=delta, rtol=o["rtol"], max_iter=o["max_iter"],
                 precond=pre)
        self.last = res
        return res.x


class _DifferentiableLogdet(torch.autograd.Function):
    """``log det(A + δI)`` as a function of a ``δ`` tensor: its derivative is ``tr (A + δI)⁻¹``."""

    @staticmethod
    def forward(ctx, delta: Tensor, curvature: DampedCurvature) -> Tensor:
        ctx.curvature = curvature
        ctx.save_for_backward(delta)
        return curvature.logdet(delta.detach())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (delta,) = ctx.saved_tensors
        deriv = ctx.curvature.logdet_derivative(delta.detach())
        return (grad * deriv).to(delta.dtype).to(delta.device).reshape(delta.shape), None


# ---------------------------------------------------------------------------- the object
class DampedCurvature:
    r"""A curvature :math:`A` factorised for ``log det`` and solves of :math:`A + \delta I`.

    Build it with :func:`factorize`. Every method takes one ``δ`` or (``logdet``) a grid.

    Args:
        op: The `(P, P)` operator :math:`A` (a constant shift found inside it taken out).
        route: The route name (see the module docstring).
        impl: The route's implementation (its ``logdet(deltas)`` and ``solve(B, δ)``).
        shift: The constant diagonal taken out of ``op`` (added to every ``δ``).

    Attributes:
        op: The operator.
        route: ``'dual'``, ``'kron'``, ``'diag'``, ``'dense'``, ``'operator'`` or
            ``'iterative'`` (see the module docstring).
        shift: A constant diagonal found inside ``op`` (added to every ``δ``).
        exact: Whether results are exact (not estimates).
    """

    def __init__(self, op, route: str, impl, shift: float = 0.0) -> None:
        self.op, self.route, self._impl, self.shift = op, route, impl, shift
        self.size = op.shape[-1]
        self.dtype, self.device = op.dtype, op.device
        self.exact = route not in ("iterative", "operator")

    def __repr__(self) -> str:
        return (f"DampedCurvature(route={self.route!r}, P={self.size}, shift={self.shift:g}, "
                f"op={type(self.op).__name__})")

    def _deltas(self, delta) -> tuple[Tensor, bool]:
        d, scalar = as_deltas(delta)
        return d + self.shift, scalar

    def logdet(self, delta=0.0) -> Tensor:
        r""":math:`\log\det(A + \delta I)` (float64) for one ``δ`` or each of a grid.

        Args:
            delta: A number, or a sequence / 1-D tensor of them. A tensor that requires grad
                gives a result that carries it (first derivatives only, see
                :meth:`logdet_derivative`; not on the ``'operator'`` route), e.g. to optimise
                the prior precision of a Laplace approximation with torch's optimisers.

        Returns:
            A float64 scalar tensor, or `(d,)` for a grid (on the CPU).

        Raises:
            InputError: If :math:`A + \delta I` is not positive definite (or, for the dual
                route, ``δ ≤ 0``).
            NotSupportedError: For a ``delta`` that requires grad on the ``'operator'`` route.
        """
        if isinstance(delta, Tensor) and delta.requires_grad and torch.is_grad_enabled():
            if isinstance(self._impl, _Operator):
                raise NotSupportedError(
                    "logdet: the 'operator' route (a Kron plus a per-parameter diagonal) has no "
                    "derivative in δ; pass a δ without grad, or factorize(op, "
                    "method='iterative') for an SLQ estimate that has one")
            return _DifferentiableLogdet.apply(delta, self)
        d, scalar = self._deltas(delta)
        with torch.no_grad():
            out = self._impl.logdet(d)
        return out[0] if scalar else out

    def logdet_derivative(self, delta=0.0) -> Tensor:
        r""":math:`\frac{d}{d\delta}\log\det(A + \delta I) = \operatorname{tr}(A + \delta I)^{-1}`.

        The gradient of the log-determinant in the prior precision, as marginal-likelihood
        optimisation needs it, for one ``δ`` or a grid. Exact routes take it from the exact
        spectrum (:attr:`eigenvalues`, computed once: on the dual route from the band form
        after a grid), :math:`\sum_i 1/(\lambda_i + \delta)` plus :math:`(P - R)/\delta` for
        the ``P - R`` zero eigenvalues outside the dual's ``R``; the iterative route from the
        same Lanczos run as ``logdet`` (an estimate). :meth:`logdet` of a ``delta`` tensor that
        requires grad differentiates through this.

        Args:
            delta: A number, or a sequence / 1-D tensor of them.

        Returns:
            A float64 scalar tensor, or `(d,)` for a grid (on the CPU).

        Raises:
            InputError: If :math:`A + \delta I` is singular or (iterative route) not positive
                definite.
            NotSupportedError: On the ``'operator'`` route (a Kron plus a per-parameter
                diagonal): factorise with ``method='iterative'`` for an estimate.
        """
        d, scalar = self._deltas(delta)
        with torch.no_grad():
            if isinstance(self._impl, _Iterative):
                run = self._impl.quadrature(float(d.min()))
                for v in d.tolist():
                    run.logdet(v)  # raises unless A + δI is positive definite on the Ritz values
                out = torch.stack([run.trace(lambda t, v=v: 1.0 / (t + v)).value.double().cpu()
                                   for v in d.tolist()])
            elif isinstance(self._impl, _Operator):
                raise NotSupportedError(
                    "logdet_derivative: the 'operator' route (a Kron plus a per-parameter "
                    "diagonal) has no exact spectrum; use factorize(op, method='iterative') for "
                    "an SLQ estimate")
            else:
                lam = self.eigenvalues.double().cpu()
                s = lam.unsqueeze(0) + d.unsqueeze(1)
                if bool((s == 0).any()) or bool((d == 0).any() and lam.numel() < self.size):
                    raise InputError("A + δI is singular for some δ")
                out = (1.0 / s).sum(1) + (self.size - lam.numel()) / d
        return out[0] if scalar else out

    def logdet_estimate(self, delta=0.0) -> Estimate | list[Estimate]:
        """``logdet`` with its standard error (zero on the exact routes).

        Args:
            delta: A number, or a sequence / 1-D tensor of them.

        Returns:
            An :class:`~curvop.linalg.Estimate` (a list for a grid); on the iterative route an
            :class:`~curvop.linalg.SLQEstimate` with the quadrature diagnostics.
        """
        d, scalar = self._deltas(delta)
        if isinstance(self._impl, _Iterative):
            out = self._impl.estimates(d)
        else:
            with torch.no_grad():
                vals = self._impl.logdet(d)
            out = [Estimate(v, torch.zeros((), dtype=torch.float64)) for v in vals]
        return out[0] if scalar else out

    def solve(self, rhs: Tensor, delta: float = 0.0) -> Tensor:
        r""":math:`(A + \delta I)^{-1}` ``rhs`` for ``rhs`` `(P,)` or `(P, m)`, in its dtype.

        Args:
            rhs: Right-hand sides :math:`B`, `(P,)` or `(P, m)`.
            delta: One damping :math:`\delta`.

        Returns:
            :math:`X = (A + \delta I)^{-1} B`, shaped and typed like ``rhs``.

        Raises:
            InputError: If ``rhs`` is malformed or :math:`A + \delta I` singular (iterative
                route: if the solver misses ``rtol``).
        """
        d, scalar = self._deltas(delta)
        if not scalar:
            raise InputError("`delta` of solve() must be a single number")
        B, back = check_rhs(rhs, self.size, rhs.dtype, self.device, "rhs")
        with torch.no_grad():
            X = self._impl.solve(B, float(d[0]))
        return back(X.to(rhs.dtype))

    def inv_quad(self, rhs: Tensor, delta: float = 0.0) -> Tensor:
        r""":math:`b^\top (A + \delta I)^{-1} b` per column of ``rhs`` (a scalar for `(P,)`).

        Args:
            rhs: The vectors :math:`b`, `(P,)` or `(P, m)`.
            delta: One damping :math:`\delta`.

        Returns:
            A scalar for `(P,)`, else `(m,)`, in ``rhs``'s dtype.

        Raises:
            InputError: As :meth:`solve`.
        """
        X = self.solve(rhs, delta)
        return (rhs * X).sum(0)

    def operator(self, delta: float) -> DampedOperator:
        r""":math:`A + \delta I` as a ``LinearOperator`` whose spectral methods use this object.

        ``solve``, ``inv_quad``, ``logdet`` and ``inv_quad_logdet`` (and so GPyTorch's
        marginal likelihoods) go through the factorisation instead of linear_operator's
        iterative defaults; products are ``op`` products plus ``δ``.

        Args:
            delta: One damping :math:`\delta` (on top of :attr:`shift`).

        Returns:
            A :class:`DampedOperator` `(P, P)`.

        Raises:
            InputError: If ``delta`` is not a single finite number.
        """
        d, scalar = as_deltas(delta)
        if not scalar:
            raise InputError("`delta` of operator() must be a single number")
        return DampedOperator(self.op, curvature=self, delta=float(d[0]))

    @property
    def eigenvalues(self) -> Tensor:
        """The exact spectrum of ``A`` where the route has it (dual: the nonzero part).

        Raises:
            NotSupportedError: On the ``'operator'`` and ``'iterative'`` routes.
        """
        impl = self._impl
        if isinstance(impl, _Dual):
            return impl.fact.eigenvalues()
        if isinstance(impl, _Dense):
            return impl.lam
        if isinstance(impl, _Diag):
            return impl.d.sort().values
        if isinstance(impl, _Kron):
            lam = torch.cat([s.reshape(-1) for s, _ in impl.op._shifted_spectrum(torch.float64)])
            return lam.sort().values
        raise NotSupportedError(f"the {self.route!r} route has no exact spectrum; use "
                                "curvop.linalg.spectral_density")


class DampedOperator(LinearOperator):
    r""":math:`A + \delta I` with ``solve`` / ``logdet`` / ``inv_quad_logdet`` from a factorisation.

    Built by :meth:`DampedCurvature.operator`. Results carry no gradient (the factorisations
    run under ``torch.no_grad``); ``logdet`` is in the operator's dtype.

    Args:
        base: The factorised operator (``curvature.op``, a constant shift taken out).
        curvature: Its :class:`DampedCurvature`.
        delta: The damping :math:`\delta` (on top of ``curvature.shift``).
    """

    def __init__(self, base: LinearOperator, *, curvature: DampedCurvature, delta: float) -> None:
        super().__init__(base, curvature=curvature, delta=delta)
        self.base, self.curvature, self.delta = base, curvature, float(delta)
        self._total = curvature.shift + self.delta  # a shift found inside the operator, too

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.base._matmul(rhs) + self._total * rhs

    def _size(self) -> torch.Size:
        return self.base.shape

    def _transpose_nonbatch(self) -> DampedOperator:
        return self

    def _diagonal(self) -> Tensor:
        return self.base._diagonal() + self._total

    def _expand_batch(self, batch_shape):
        if tuple(batch_shape) == ():
            return self
        raise NotSupportedError("a damped curvature has no batch dimensions")

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor):
        return (None,) * len(self.representation())

    def _columns(self, rhs: Tensor) -> Tensor:
        if rhs.dim() > 2:
            batch, k = rhs.shape[:-2], rhs.shape[-1]
            X = self._columns(rhs.movedim(-2, 0).reshape(rhs.shape[-2], -1))
            return X.reshape(rhs.shape[-2], *batch, k).movedim(0, -2)
        return self.curvature.solve(rhs, self.delta)

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        r"""``(A + δI)⁻¹ R`` (or ``L (A + δI)⁻¹ R``) through the factorisation.

        Args:
            right_tensor: :math:`R`, `(P,)`, `(P, m)` or `(..., P, m)`.
            left_tensor: Optional :math:`L`, `(..., k, P)`.

        Returns:
            :math:`(A + \delta I)^{-1} R`, shaped like ``right_tensor``, or
            :math:`L (A + \delta I)^{-1} R` `(..., k, m)`.

        Raises:
            InputError: As :meth:`DampedCurvature.solve`.
        """
        X = self._columns(right_tensor)
        return X if left_tensor is None else left_tensor @ X

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int = 0):
        if num_tridiag:
            return super()._solve(rhs, preconditioner, num_tridiag)
        return self._columns(rhs)

    def logdet(self) -> Tensor:
        r"""``log det(A + δI)`` through the factorisation (see :meth:`DampedCurvature.logdet`).

        Returns:
            A scalar in the operator's dtype and device.

        Raises:
            InputError: If :math:`A + \delta I` is not positive definite.
        """
        val = self.curvature.logdet(self.delta)
        return val.to(dtype=self.dtype, device=self.device)

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False,
                        reduce_inv_quad: bool = True) -> tuple[Tensor, Tensor]:
        r"""``(Rᵀ (A + δI)⁻¹ R, log det(A + δI))`` through the factorisation.

        Args:
            inv_quad_rhs: :math:`R`, `(P,)` or `(P, m)`, or None for no inverse quadratic form.
            logdet: Whether to compute the log-determinant (else a zero is returned for it).
            reduce_inv_quad: Sum the inverse quadratic form over the columns of `(P, m)`.

        Returns:
            ``(inv_quad, logdet)``: :math:`\sum_j r_j^\top (A + \delta I)^{-1} r_j` (a scalar,
            or `(m,)` unreduced) and :math:`\log\det(A + \delta I)` (a scalar), in the
            operator's dtype.

        Raises:
            InputError: If neither ``inv_quad_rhs`` nor ``logdet`` is asked for, or
                :math:`A + \delta I` is not positive definite.
        """
        if inv_quad_rhs is None and not logdet:
            raise InputError("inv_quad_logdet() needs `inv_quad_rhs` or `logdet=True`")
        inv_quad = torch.zeros((), dtype=self.dtype, device=self.device)
        if inv_quad_rhs is not None:
            terms = (inv_quad_rhs * self._columns(inv_quad_rhs)).sum(-2 if inv_quad_rhs.dim()
                                                                     > 1 else -1)
            inv_quad = terms.sum(-1) if reduce_inv_quad and inv_quad_rhs.dim() > 1 else terms
        ld = self.logdet() if logdet else torch.zeros((), dtype=self.dtype, device=self.device)
        return inv_quad, ld


# ---------------------------------------------------------------------------- dispatch
def _constant_diag(D) -> float | None:
    if isinstance(D, ConstantDiagLinearOperator):
        return float(D.diag_values.reshape(-1)[0])
    if isinstance(D, DiagLinearOperator):
        d = D.diagonal()
        if d.dim() == 1 and bool((d == d[0]).all()):
            return float(d[0])
    return None


def factorize(op, *, method: str = "auto", dual: str = "auto", refine: int = 0,
              compress: bool = True, memory_budget: int | None = None,
              num_probes: int = 30, max_steps: int = 100, quad_tol: float | None = 1e-6,
              seed: int | None = 0, generator: torch.Generator | None = None,
              solver: str = "cg", precond=None, rtol: float = 1e-8, max_iter: int = 1000
              ) -> DampedCurvature:
    r"""Factorise ``op`` for :math:`\log\det(A + \delta I)` and :math:`(A + \delta I)^{-1}`.

    Nothing heavy happens here: the first ``logdet``/``solve`` builds what it needs (Gram
    matrix, eigenbases, Lanczos run) and keeps it for later ``δ``.

    Args:
        op: A `(P, P)` curvature: a curvop operator (``full_operator``, ``dataset_operator``,
            ``Kron``, ``DampedKron``, ``KronAddedDiag``), a linear_operator
            ``DiagLinearOperator``, ``DenseLinearOperator``, ``RootLinearOperator`` (low rank,
            e.g. from :func:`~curvop.linalg.low_rank_operator`), any of these plus a constant
            diagonal, any other symmetric ``LinearOperator``, or a dense tensor.
        method: A route name to force (see the module docstring), or ``'auto'``.
        dual: Factorisation of the Gram matrix on the dual route: ``'auto'`` (Cholesky per
            ``δ``; the band form once a grid of ≥ 3 ``δ`` is asked for, and for every ``δ``
            and solve after it), ``'band'``, ``'eigh'`` or ``'cholesky'`` (see
            :class:`~curvop.linalg.DualFactorization`).
        refine: Iterative-refinement steps of dual-route solves.
        compress: Compress the loss-Hessian square roots to their rank (dual route).
        memory_budget: Bytes of per-sample rows held while building the Gram matrix.
        num_probes: SLQ probes (iterative route).
        max_steps: Most Lanczos steps (iterative route).
        quad_tol: SLQ quadrature tolerance per probe, relative to `P` (iterative route).
        seed: Seed of the SLQ probes.
        generator: CPU generator of the SLQ probes (instead of ``seed``).
        solver: ``'cg'`` (positive definite) or ``'minres'`` (symmetric), iterative route.
        precond: Preconditioner of the iterative solver (see :func:`~curvop.linalg.cg`), or a
            callable ``δ ↦ preconditioner``.
        rtol: True relative residual of iterative solves.
        max_iter: Iteration limit of iterative solves.

    Returns:
        A :class:`DampedCurvature`.

    Raises:
        InputTypeError: If ``op`` is not a square operator or tensor.
        InputError: If a forced ``method`` does not apply to ``op`` or an option is malformed.

    Example:
        >>> import torch
        >>> M = torch.randn(5, 40, dtype=torch.float64)      # rank 5 in 40 dimensions
        >>> fac = factorize(M.T @ M)
        >>> dense = [torch.logdet(M.T @ M + d * torch.eye(40, dtype=torch.float64))
        ...          for d in (0.1, 1.0)]
        >>> bool(torch.allclose(fac.logdet([0.1, 1.0]), torch.stack(dense)))
        True
    """
    if method not in _ROUTES:
        raise InputError(f"`method` must be one of {_ROUTES}; got {method!r}")
    if solver not in ("cg", "minres"):
        raise InputError(f"`solver` must be 'cg' or 'minres'; got {solver!r}")
    op = check_square_operator(op)
    opts = dict(num_probes=num_probes, max_steps=max_steps, quad_tol=quad_tol, seed=seed,
                generator=generator, solver=solver, precond=precond, rtol=rtol,
                max_iter=max_iter)
    base, shift = op, 0.0
    if isinstance(op, AddedDiagLinearOperator):
        c = _constant_diag(op._diag_tensor)
        if c is not None:
            base, shift = op._linear_op, c
    route, impl = _choose(base, method, dual, refine, compress, memory_budget, opts)
    return DampedCurvature(base, route, impl, shift)


def _choose(op, method, dual, refine, compress, budget, opts):
    from curvop.operators.kron import _KronBase
    from curvop.operators.kron_damped import KronAddedDiag

    def want(route: str) -> bool:
        return method in ("auto", route)

    if want("diag") and isinstance(op, DiagLinearOperator):
        return "diag", _Diag(op.diagonal())
    if isinstance(op, KronAddedDiag) and method in ("auto", "operator"):
        return "operator", _Operator(op)
    if want("kron") and isinstance(op, _KronBase) and not isinstance(op, KronAddedDiag):
        return "kron", _Kron(op)
    if want("dual") and isinstance(op, RootLinearOperator) and not isinstance(
            op, DiagLinearOperator):
        root = op.root.to_dense()
        if root.dim() == 2 and (root.shape[1] < root.shape[0] or method == "dual"):
            fact = DualFactorization(DataSpaceDual(root.mT), dual)
            return "dual", _Dual(fact, refine)
    if want("dual") and sqrt_form_batches(op) is not None:
        d = DataSpaceDual(op, compress=compress, memory_budget=budget)
        if d.num_rows < d.size or method == "dual":
            return "dual", _Dual(DualFactorization(d, dual), refine)
        if method == "auto" and _fits(op):
            return "dense", _Dense(op.to_dense())
    if want("dense") and isinstance(op, DenseLinearOperator):
        return "dense", _Dense(op.to_dense())
    if method == "dense":
        _checks.check_fits(tuple(op.shape), torch.float64, op.device, "the dense operator")
        return "dense", _Dense(op.to_dense())
    if method in ("auto", "iterative"):
        return "iterative", _Iterative(op, opts)
    raise InputError(f"the {method!r} route does not apply to {type(op).__name__}")


def _fits(op) -> bool:
    P = op.shape[-1]
    return P * P * 8 * 3 <= _checks.available_bytes(op.device) and P <= 20000


def logdet(op, delta=0.0, **options) -> Tensor:
    r""":math:`\log\det(A + \delta I)` by the cheapest exact route (see :func:`factorize`).

    Args:
        op: The operator (see :func:`factorize`).
        delta: A number or a grid of numbers.
        **options: Options of :func:`factorize`.

    Returns:
        A float64 scalar (or `(d,)` for a grid).

    Raises:
        InputError: As :meth:`DampedCurvature.logdet` and :func:`factorize`.
    """
    return factorize(op, **options).logdet(delta)


def solve(op, rhs: Tensor, delta: float = 0.0, **options) -> Tensor:
    r""":math:`(A + \delta I)^{-1}` ``rhs`` by the cheapest exact route (see :func:`factorize`).

    Args:
        op: The operator.
        rhs: `(P,)` or `(P, m)`.
        delta: The damping.
        **options: Options of :func:`factorize`.

    Returns:
        :math:`(A + \delta I)^{-1}` ``rhs``, shaped and typed like ``rhs``.

    Raises:
        InputError: As :meth:`DampedCurvature.solve` and :func:`factorize`.
    """
    return factorize(op, **options).solve(rhs, delta)
