r"""Kronecker-factored block-diagonal curvature as a lazy ``linear_operator`` LinearOperator.

:class:`Kron` holds one block per parameter tensor, in parameter order. A block is either a
Kronecker product ``A ⊗ B`` (``torch.kron`` order: ``A`` the output-side factor, ``B`` the input
side, matching a ``(out, in)`` weight flattened row-major) or a dense block ``C`` (e.g. a bias):

.. math::
    K = \operatorname{blockdiag}(A_1 \otimes B_1,\; C_2,\; A_3 \otimes B_3,\; \ldots).

Nothing ``P × P`` is formed except by :meth:`~_KronBase.to_dense`. Spectral routines (``solve``,
``logdet``, ``inv_quad_logdet``, ``root_decomposition``, ``eigh``) are exact, through the
eigendecompositions ``A = Q_A Λ_A Q_Aᵀ`` of the factors, computed once (lazily, in float64) and
cached: ``A ⊗ B + δI = (Q_A ⊗ Q_B)(Λ_A ⊗ Λ_B + δI)(Q_A ⊗ Q_B)ᵀ``. Damped variants live in
:mod:`curvop.operators.kron_damped`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from linear_operator.operators import (
    DenseLinearOperator,
    DiagLinearOperator,
    KroneckerProductLinearOperator,
    LinearOperator,
    MatmulLinearOperator,
    RootLinearOperator,
)
from torch import Tensor

from curvop._checks import check_fits
from curvop.errors import InputError, InputTypeError, NotSupportedError

__all__ = ["Kron"]

_BATCH_MSG = (
    "{cls} is a single (P, P) matrix and has no batch dimensions; {what} is not supported. "
    "Use it on (P,) or (P, k) right-hand sides (or (..., P, k), which it broadcasts)."
)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _check_factor(F: object, name: str, ref: Tensor | None) -> Tensor:
    """Validate one Kronecker factor (square, finite, symmetric, same dtype/device as ``ref``)."""
    if not isinstance(F, Tensor):
        raise InputTypeError(f"`{name}` must be a torch.Tensor; got {type(F).__name__}")
    if not F.dtype.is_floating_point:
        raise InputTypeError(f"`{name}` must have a real floating dtype; got {F.dtype}")
    if F.dim() != 2 or F.shape[0] != F.shape[1] or F.shape[0] == 0:
        raise InputError(
            f"`{name}` must be a non-empty square 2-D tensor; got shape {tuple(F.shape)}"
        )
    if ref is not None and F.dtype != ref.dtype:
        raise InputTypeError(
            f"`{name}` must have the dtype of the first factor ({ref.dtype}); got {F.dtype}"
        )
    if ref is not None and F.device != ref.device:
        raise InputError(
            f"`{name}` must be on the device of the first factor ({ref.device}); got {F.device}"
        )
    with torch.no_grad():
        if not bool(torch.isfinite(F).all()):
            raise InputError(f"`{name}` must be finite; got NaN or inf entries")
        scale = float(F.abs().max())
        if F.shape[0] <= 2048:
            asym = float((F - F.mT).abs().max())
        else:  # a transposed read of a large factor is slow: probe with two fixed vectors
            gen = torch.Generator(F.device).manual_seed(0)
            u, v = torch.randn(2, F.shape[0], 1, generator=gen, device=F.device, dtype=F.dtype)
            asym = float((u.mT @ F @ v - v.mT @ F @ u).abs()) / float(u.norm() * v.norm())
        if asym > 100 * F.shape[0] * _eps(F.dtype) * scale:
            raise InputError(
                f"`{name}` must be symmetric; got max |F - Fᵀ| = {asym:.3g} (max |F| = {scale:.3g})"
            )
    return F


def _flatten_kfacs(kfacs: object) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    """Turn ``[[A, B], [C], ...]`` into flat factors and a layout (factors per block)."""
    if isinstance(kfacs, Tensor) or not isinstance(kfacs, Sequence) or isinstance(kfacs, str):
        raise InputTypeError(
            "`kfacs` must be a list of blocks, each [A, B] (block A ⊗ B) or [C] (dense block); "
            f"got {type(kfacs).__name__}"
        )
    if len(kfacs) == 0:
        raise InputError("`kfacs` must hold at least one block; got an empty list")
    flat: list[Tensor] = []
    layout: list[int] = []
    for b, block in enumerate(kfacs):
        if isinstance(block, Tensor) or not isinstance(block, Sequence):
            raise InputTypeError(
                f"`kfacs[{b}]` must be a list [A, B] or [C] of tensors; got {type(block).__name__}"
            )
        if len(block) not in (1, 2):
            raise InputError(
                f"`kfacs[{b}]` must hold 1 factor ([C]) or 2 factors ([A, B]); got {len(block)}"
            )
        for k, F in enumerate(block):
            flat.append(_check_factor(F, f"kfacs[{b}][{k}]", flat[0] if flat else None))
        layout.append(len(block))
    return tuple(flat), tuple(layout)


def _as_column_matrix(rhs: Tensor, P: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Reshape ``(P,)``, ``(P, k)`` or ``(*b, P, k)`` into ``(P, m)`` and return the inverse map."""
    if rhs.dim() == 1:
        return rhs.unsqueeze(-1), lambda y: y.squeeze(-1)
    if rhs.dim() == 2:
        return rhs, lambda y: y
    batch, k = rhs.shape[:-2], rhs.shape[-1]
    x = rhs.movedim(-2, 0).reshape(P, -1)
    return x, lambda y: y.reshape(P, *batch, k).movedim(0, -2)


def _shape_inv_quad(terms: Tensor, rhs: Tensor, reduce: bool) -> Tensor:
    """Per-column terms `(m,)` back to `(..., k)` (summed if ``reduce``; a scalar for `(P,)`)."""
    if rhs.dim() == 1:
        return terms[0]
    out = terms.reshape(*rhs.shape[:-2], rhs.shape[-1])
    return out.sum(-1) if reduce else out


def _kron_apply(F1: Tensor, F2: Tensor, X: Tensor) -> Tensor:
    """``(F1 ⊗ F2) x`` for the columns of ``X`` `(n1 * n2, m)`, i.e. ``F1 X F2ᵀ`` per column.

    Two plain GEMMs with explicit transposes: broadcasting ``F2`` over a batch would copy it.
    """
    n1, n2, m = F1.shape[-1], F2.shape[-1], X.shape[-1]
    if m == 1:
        return (F1 @ X.reshape(n1, n2) @ F2.mT).reshape(-1, 1)
    T = (F1 @ X.reshape(n1, n2 * m)).reshape(-1, n2, m).transpose(0, 1).reshape(n2, -1)
    return (F2 @ T).reshape(F2.shape[0], -1, m).transpose(0, 1).reshape(-1, m)


class _BlockDiag(LinearOperator):
    """Ragged block-diagonal of (possibly rectangular) LinearOperators, used for lazy roots."""

    def __init__(self, *blocks: LinearOperator):
        super().__init__(*blocks)
        self.blocks = blocks
        self._rows = [b.shape[-2] for b in blocks]
        self._cols = [b.shape[-1] for b in blocks]

    def _size(self) -> torch.Size:
        return torch.Size((sum(self._rows), sum(self._cols)))

    def _matmul(self, rhs: Tensor) -> Tensor:
        x, back = _as_column_matrix(rhs, self.shape[-1])
        parts = torch.split(x, self._cols, dim=0)
        return back(torch.cat([b._matmul(p) for b, p in zip(self.blocks, parts)], dim=0))

    def _transpose_nonbatch(self) -> LinearOperator:
        return _BlockDiag(*(b._transpose_nonbatch() for b in self.blocks))

    def _diagonal(self) -> Tensor:
        return torch.cat([b._diagonal() for b in self.blocks])

    def to_dense(self) -> Tensor:
        check_fits(tuple(self.shape), self.dtype, self.device, "to_dense()")
        return torch.block_diag(*(b.to_dense() for b in self.blocks))

    def _expand_batch(self, batch_shape: torch.Size | list[int]) -> LinearOperator:
        if len(batch_shape) == 0:
            return self
        raise NotSupportedError(_BATCH_MSG.format(cls="_BlockDiag", what="expanding"))

    def _unsqueeze_batch(self, dim: int) -> LinearOperator:
        raise NotSupportedError(_BATCH_MSG.format(cls="_BlockDiag", what="unsqueezing"))


def _version_key(tensors: Sequence[Tensor]) -> tuple[int, ...]:
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # inference tensors carry no version counter
        return (-1,) * len(tensors)


class _KronBase(LinearOperator):
    """Shared machinery of :class:`Kron` and its damped variants (not public).

    Subclasses pass the flat factors as positional tensors and the block structure as the
    ``layout`` keyword (number of factors per block), so that linear_operator's
    ``cls(*self._args, **self._kwargs)`` rebuilds them. They add a shift through
    :meth:`_shift_full` (per-parameter, for matmul and diagonal) and, where it is constant per
    block, :meth:`_block_shifts` (used by the exact spectral routines).
    """

    def __init__(self, *factors: Tensor, layout: Sequence[int], **kwargs):
        layout = tuple(int(n) for n in layout)
        if any(n not in (1, 2) for n in layout) or sum(layout) != len(factors) or not layout:
            raise InputError(
                f"`layout` must list 1 or 2 factors per block and sum to the number of factors "
                f"({len(factors)}); got {layout}"
            )
        # factors are validated once, where users hand them in (`Kron(kfacs)`): this path is
        # also linear_operator's rebuild inside every product, which must stay cheap
        ref = factors[0]
        if any(F.dtype != ref.dtype or F.device != ref.device or F.dim() != 2 for F in factors):
            for i, F in enumerate(factors):
                _check_factor(F, f"factors[{i}]", factors[0] if i else None)
        super().__init__(*factors, layout=layout, **kwargs)
        self._factors = factors
        self._layout = layout
        blocks, start = [], 0
        for n in layout:
            blocks.append(tuple(factors[start : start + n]))
            start += n
        self._blocks: list[tuple[Tensor, ...]] = blocks
        self._sizes = [math.prod(F.shape[0] for F in blk) for blk in blocks]
        self._P = sum(self._sizes)
        # one-element box, shared with the damped operators derived from this one (same
        # factors): a grid of dampings decomposes the factors once
        self._eig_box: list[tuple[tuple[int, ...], list] | None] = [None]

    @property
    def _eig_cache(self) -> tuple[tuple[int, ...], list] | None:
        """``(version key, eigenpairs)`` of the factors once computed (shared box), or None."""
        return self._eig_box[0]

    # ------------------------------------------------------------------ structure
    @property
    def kfacs(self) -> list[list[Tensor]]:
        """The blocks as ``[[A, B], [C], ...]`` (the stored tensors, not copies)."""
        return [list(blk) for blk in self._blocks]

    @property
    def layout(self) -> tuple[int, ...]:
        """Number of factors per block (2 for ``A ⊗ B``, 1 for a dense ``C``)."""
        return self._layout

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Side length of each diagonal block; they sum to ``P``."""
        return tuple(self._sizes)

    @property
    def num_blocks(self) -> int:
        """Number of diagonal blocks (one per parameter tensor)."""
        return len(self._blocks)

    def _size(self) -> torch.Size:
        return torch.Size((self._P, self._P))

    def _transpose_nonbatch(self) -> LinearOperator:
        # Symmetric, so the value is self; under autograd, rebuild from transposed factors so
        # that gradients w.r.t. the raw (unsymmetrised) factor entries are those of Kᵀ.
        if torch.is_grad_enabled() and any(F.requires_grad for F in self._factors):
            return type(self)(*(F.mT for F in self._factors), **self._kwargs)
        return self

    def _shift_full(self) -> Tensor | None:
        """Per-parameter diagonal added to the Kronecker blocks, `(P,)`, or None."""
        return None

    def _block_shifts(self) -> Tensor | None:
        """Per-block scalar shift `(num_blocks,)` used by the exact spectral routines, or None."""
        return None

    def __repr__(self) -> str:
        shapes = ["⊗".join(f"{F.shape[0]}" for F in blk) for blk in self._blocks]
        return (
            f"{type(self).__name__}(P={self._P}, blocks=[{', '.join(shapes)}], dtype={self.dtype})"
        )

    # ------------------------------------------------------------------ products
    def _check_rhs(self, rhs: Tensor, name: str = "rhs") -> None:
        if not isinstance(rhs, Tensor):
            raise InputTypeError(f"`{name}` must be a torch.Tensor; got {type(rhs).__name__}")
        rows = rhs.shape[0] if rhs.dim() == 1 else (rhs.shape[-2] if rhs.dim() else None)
        if rows != self._P:
            raise InputError(
                f"`{name}` must have shape (P,), (P, k) or (..., P, k) with P = {self._P}; "
                f"got {tuple(rhs.shape)}"
            )
        if rhs.device != self.device:
            raise InputError(f"`{name}` must be on {self.device}; got {rhs.device}")
        if rhs.dtype != self.dtype:
            raise InputTypeError(f"`{name}` must have dtype {self.dtype}; got {rhs.dtype}")

    def matmul(self, other: Tensor | LinearOperator) -> Tensor | LinearOperator:
        """``K @ other`` for ``other`` of shape `(P,)`, `(P, k)` or `(..., P, k)`.

        Args:
            other: A tensor of shape `(P,)`, `(P, k)` or `(..., P, k)`, or a LinearOperator
                with ``P`` rows.

        Returns:
            ``K @ other``, shaped like ``other`` (a LinearOperator for a LinearOperator).

        Raises:
            InputError: if ``other`` has the wrong length or device.
            InputTypeError: if ``other`` is not a tensor or has another dtype.
        """
        if isinstance(other, Tensor):
            self._check_rhs(other, "other")
        return super().matmul(other)

    def _kron_matmul(self, x: Tensor) -> Tensor:
        parts = torch.split(x, self._sizes, dim=0)
        out = [
            blk[0] @ p if len(blk) == 1 else _kron_apply(blk[0], blk[1], p)
            for blk, p in zip(self._blocks, parts)
        ]
        return torch.cat(out, dim=0)

    def _matmul(self, rhs: Tensor) -> Tensor:
        if rhs.shape[0 if rhs.dim() == 1 else -2] != self._P:
            raise InputError(
                f"right-hand side must have {self._P} rows; got shape {tuple(rhs.shape)}"
            )
        x, back = _as_column_matrix(rhs, self._P)
        y = self._kron_matmul(x)
        shift = self._shift_full()
        if shift is not None:
            y = y + shift.unsqueeze(-1) * x
        return back(y)

    def _diagonal(self) -> Tensor:
        diags = [
            torch.diagonal(blk[0])
            if len(blk) == 1
            else torch.outer(torch.diagonal(blk[0]), torch.diagonal(blk[1])).reshape(-1)
            for blk in self._blocks
        ]
        d = torch.cat(diags)
        shift = self._shift_full()
        return d if shift is None else d + shift

    def to_dense(self) -> Tensor:
        """The dense `(P, P)` matrix ``blockdiag(torch.kron(A, B), C, ...)`` (+ the shift).

        Returns:
            A `(P, P)` tensor of the operator's dtype and device.

        Raises:
            MemoryBudgetError: if the `(P, P)` matrix does not fit in free memory.
        """
        check_fits((self._P, self._P), self.dtype, self.device, f"{type(self).__name__}.to_dense()")
        dense = torch.block_diag(
            *(blk[0] if len(blk) == 1 else torch.kron(blk[0], blk[1]) for blk in self._blocks)
        )
        shift = self._shift_full()
        return dense if shift is None else dense + torch.diag(shift)

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        if batch_indices:
            raise NotSupportedError(
                _BATCH_MSG.format(cls=type(self).__name__, what="batch indexing")
            )
        shape = torch.broadcast_shapes(row_index.shape, col_index.shape)
        r, c = row_index.expand(shape).reshape(-1), col_index.expand(shape).reshape(-1)
        ends = torch.tensor(self._sizes, device=r.device).cumsum(0)
        rb = torch.searchsorted(ends, r, right=True)
        cb = torch.searchsorted(ends, c, right=True)
        out = torch.zeros(r.shape, dtype=self.dtype, device=self.device)
        start = 0
        for b, blk in enumerate(self._blocks):
            mask = (rb == b) & (cb == b)
            rl, cl = r[mask] - start, c[mask] - start
            if len(blk) == 1:
                vals = blk[0][rl, cl]
            else:
                nB = blk[1].shape[0]
                vals = blk[0][rl // nB, cl // nB] * blk[1][rl % nB, cl % nB]
            out = out.index_put((mask.nonzero().squeeze(-1),), vals)
            start += self._sizes[b]
        shift = self._shift_full()
        if shift is not None:
            out = out + torch.where(r == c, shift[r], out.new_zeros(()))
        return out.reshape(shape)

    # ------------------------------------------------------------------ batch hooks
    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        if batch_indices:
            raise NotSupportedError(
                _BATCH_MSG.format(cls=type(self).__name__, what="batch indexing")
            )
        return super()._getitem(row_index, col_index)

    def _expand_batch(self, batch_shape: torch.Size | list[int]) -> LinearOperator:
        if len(batch_shape) == 0:
            return self
        raise NotSupportedError(
            _BATCH_MSG.format(
                cls=type(self).__name__, what=f"expanding to batch shape {tuple(batch_shape)}"
            )
        )

    def _unsqueeze_batch(self, dim: int) -> LinearOperator:
        raise NotSupportedError(_BATCH_MSG.format(cls=type(self).__name__, what="unsqueezing"))

    def _permute_batch(self, *dims: int) -> LinearOperator:
        if not dims:
            return self
        raise NotSupportedError(_BATCH_MSG.format(cls=type(self).__name__, what="permuting"))

    # ------------------------------------------------------------------ eigendecomposition
    def _cache_ok(self) -> bool:
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in self.representation()))

    def _factor_eigs(self) -> list[list[tuple[Tensor, Tensor]]]:
        """Float64 ``(eigenvalues, eigenvectors)`` of every factor, PSD-checked and truncated.

        Eigenvalues at or below ``n · eps(dtype) · λ_max`` (the rank tolerance of
        ``torch.linalg.matrix_rank``, ``eps`` of the operator's dtype) are set to exactly zero,
        so rank-deficient factors (e.g. KFAC factors from one datum) give exact zeros.
        Computed once and cached (keyed by the factors' version counters) unless autograd
        needs to track the factors, in which case it is recomputed per call.

        Raises:
            InputError: if a factor has a clearly negative eigenvalue (it is not PSD).
        """
        key, cache_ok = _version_key(self._factors), self._cache_ok()
        cached = self._eig_box[0]
        if cache_ok and cached is not None and cached[0] == key:
            return cached[1]  # never when autograd tracks: the cache holds no graph
        eps = _eps(self.dtype)
        res = []
        for b, blk in enumerate(self._blocks):
            pairs = []
            for k, F in enumerate(blk):
                lam, Q = torch.linalg.eigh(F.to(torch.float64))
                top = lam.abs().max()
                tol = F.shape[0] * eps * top
                if bool(lam.min() < -100 * tol):
                    raise InputError(
                        f"factor {k} of block {b} must be positive semi-definite for spectral "
                        f"routines; got eigenvalue {float(lam.min()):.3g} (max {float(top):.3g})"
                    )
                pairs.append((torch.where(lam > tol, lam, torch.zeros_like(lam)), Q))
            res.append(pairs)
        if cache_ok:
            self._eig_box[0] = (key, res)
        return res

    def _spectrum(
        self, dtype: torch.dtype | None = None
    ) -> list[tuple[Tensor, tuple[Tensor, ...]]]:
        """Per block: eigenvalue grid `(n_A, n_B)` or `(n_C,)` of the Kronecker part, and bases."""
        dtype = dtype or self.dtype
        out = []
        for pairs in self._factor_eigs():
            if len(pairs) == 1:
                lam = pairs[0][0]
            else:
                lam = torch.outer(pairs[0][0], pairs[1][0])
            out.append((lam.to(dtype), tuple(Q.to(dtype) for _, Q in pairs)))
        return out

    def _shifted_spectrum(self, dtype: torch.dtype | None = None) -> list[tuple[Tensor, tuple]]:
        spec = self._spectrum(dtype)
        shifts = self._block_shifts()
        if shifts is None:
            return spec
        shifts = shifts.to(dtype or self.dtype)
        return [(lam + shifts[b], Qs) for b, (lam, Qs) in enumerate(spec)]

    @staticmethod
    def _rotate(Qs: tuple[Tensor, ...], x: Tensor, transpose: bool) -> Tensor:
        """``(Q_A ⊗ Q_B)ᵀ x`` (``transpose``) or ``(Q_A ⊗ Q_B) x`` for ``x`` `(n, m)`."""
        Qs = tuple(Q.mT for Q in Qs) if transpose else Qs
        return Qs[0] @ x if len(Qs) == 1 else _kron_apply(Qs[0], Qs[1], x)

    def _spectral_apply(self, rhs: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``Q f(Λ) Qᵀ rhs`` for ``rhs`` `(P,)`, `(P, k)` or `(..., P, k)`; Λ includes the shift."""
        x, back = _as_column_matrix(rhs, self._P)
        parts = torch.split(x, self._sizes, dim=0)
        out = []
        for (lam, Qs), p in zip(self._shifted_spectrum(), parts):
            y = self._rotate(Qs, p, transpose=True) * fn(lam).reshape(-1, 1)
            out.append(self._rotate(Qs, y, transpose=False))
        return back(torch.cat(out, dim=0))

    def _positive_spectrum(self, what: str) -> list[tuple[Tensor, tuple]]:
        spec = self._shifted_spectrum()
        for b, (lam, _) in enumerate(spec):
            if bool((lam <= 0).any()):
                raise InputError(
                    f"{what} needs a positive definite operator, but block {b} of "
                    f"{type(self).__name__} "
                    f"has eigenvalue {float(lam.min()):.3g}; damp it first, e.g. "
                    "K.damped(delta) or K.add_jitter(delta)"
                )
        return spec

    # ------------------------------------------------------------------ exact linear algebra
    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """Exact ``K⁻¹ R`` (or ``L K⁻¹ R``) through the factor eigenbases.

        Args:
            right_tensor: ``R`` of shape `(P,)`, `(P, k)` or `(..., P, k)`.
            left_tensor: optional ``L`` of shape `(..., O, P)`.

        Returns:
            ``K⁻¹ R`` shaped like ``R``, or ``L K⁻¹ R``.

        Raises:
            InputError: if ``R`` has the wrong length or device, or the operator is singular.
            InputTypeError: if ``R`` is not a tensor of the operator's dtype.
        """
        self._check_rhs(right_tensor, "right_tensor")
        self._positive_spectrum("solve()")
        res = self._spectral_apply(right_tensor, torch.reciprocal)
        return res if left_tensor is None else left_tensor @ res

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int = 0):
        if num_tridiag:
            return super()._solve(rhs, preconditioner, num_tridiag)
        self._positive_spectrum("solve()")
        return self._spectral_apply(rhs, torch.reciprocal)

    def sqrt_inv_matmul(self, rhs: Tensor, lhs: Tensor | None = None):
        """Exact ``K^{-1/2} R`` through the factor eigenbases.

        Args:
            rhs: ``R`` of shape `(P,)`, `(P, k)` or `(..., P, k)`.
            lhs: Optional ``L`` of shape `(..., O, P)`.

        Returns:
            ``K^{-1/2} R`` shaped like ``R``; with ``lhs``, the pair
            ``(L K^{-1/2} R, rowsum((L K^{-1/2})²))`` as linear_operator defines it.

        Raises:
            InputError: If ``R`` has the wrong length or device, or ``K`` is singular.
            InputTypeError: If ``R`` is not a tensor of the operator's dtype.
        """
        self._check_rhs(rhs, "rhs")
        self._positive_spectrum("sqrt_inv_matmul()")
        res = self._spectral_apply(rhs, torch.rsqrt)
        if lhs is None:
            return res
        left = self._spectral_apply(lhs.mT, torch.rsqrt)
        return lhs @ res, left.pow(2).sum(-2)

    def _logdet_exact(self) -> Tensor:
        spec = self._shifted_spectrum()
        for b, (lam, _) in enumerate(spec):
            if bool((lam < 0).any()):
                raise InputError(
                    f"logdet() needs a positive semi-definite operator; block {b} has eigenvalue "
                    f"{float(lam.min()):.3g}"
                )
        return sum(torch.log(lam).sum() for lam, _ in spec)

    def logdet(self) -> Tensor:
        """Exact ``log det K`` from the eigenvalues of the factors.

        For an undamped :class:`Kron` with a singular factor (e.g. rank-1 KFAC factors) this is
        ``-inf``: factor eigenvalues below the rank tolerance are set to exactly zero. Damp first
        (``K.damped(δ)``) for a finite value.

        Returns:
            A scalar tensor: ``Σ_b Σ log λ_b`` over the eigenvalues of every block.

        Raises:
            InputError: If ``K`` has a negative eigenvalue (not positive semi-definite).
        """
        return self._logdet_exact()

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        """Exact ``diag(Rᵀ K⁻¹ R)`` (summed over columns if ``reduce_inv_quad``).

        Args:
            inv_quad_rhs: ``R`` of shape `(P,)`, `(P, k)` or `(..., P, k)`.
            reduce_inv_quad: Sum the terms over the ``k`` columns.

        Returns:
            The terms, `(..., k)`, or their sum `(...)` (a scalar for a `(P,)` ``R``).

        Raises:
            InputError: If ``R`` is malformed or ``K`` is singular.
            InputTypeError: If ``R`` is not a tensor of the operator's dtype.
        """
        return self.inv_quad_logdet(inv_quad_rhs, False, reduce_inv_quad)[0]

    def inv_quad_logdet(
        self,
        inv_quad_rhs: Tensor | None = None,
        logdet: bool = False,
        reduce_inv_quad: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Exact ``(Rᵀ K⁻¹ R, log det K)`` in the eigenbasis: ``Σ (Qᵀr)² / λ`` and ``Σ log λ``.

        Args:
            inv_quad_rhs: ``R`` of shape `(P,)` or `(P, k)` (or `(..., P, k)`), or None.
            logdet: whether to compute the log-determinant.
            reduce_inv_quad: sum the inverse quadratic terms over the `k` columns.

        Returns:
            ``(inv_quad, logdet)``; a term not asked for is an empty tensor. ``inv_quad`` has
            shape `(..., k)` (or `(...)` reduced; a scalar for a `(P,)` right-hand side).

        Raises:
            InputTypeError: if ``R`` is not a tensor of the operator's dtype.
            InputError: if neither term is requested, ``R`` is malformed, or a needed inverse
                does not exist (singular operator).
        """
        if inv_quad_rhs is None and not logdet:
            raise InputError("inv_quad_logdet() needs `inv_quad_rhs` or `logdet=True`; got neither")
        empty = torch.empty(0, dtype=self.dtype, device=self.device)
        inv_quad = empty
        if inv_quad_rhs is not None:
            self._check_rhs(inv_quad_rhs, "inv_quad_rhs")
            spec = self._positive_spectrum("inv_quad()")
            x, _ = _as_column_matrix(inv_quad_rhs, self._P)
            terms = 0
            for (lam, Qs), p in zip(spec, torch.split(x, self._sizes, dim=0)):
                y = self._rotate(Qs, p, transpose=True)
                terms = terms + (y.pow(2) / lam.reshape(-1, 1)).sum(0)
            inv_quad = _shape_inv_quad(terms, inv_quad_rhs, reduce_inv_quad)
        return inv_quad, (self._logdet_exact() if logdet else empty)

    def _symeig(self, eigenvectors: bool = False, return_evals_as_lazy: bool = False):
        spec = self._shifted_spectrum()
        evals = torch.cat([lam.reshape(-1) for lam, _ in spec])
        if not eigenvectors:
            return evals, None
        return evals, self._eig_operator(spec, None)

    def _eig_operator(self, spec, weights: Callable[[Tensor], Tensor] | None) -> LinearOperator:
        """Lazy ``blockdiag((Q_A ⊗ Q_B) diag(w(λ)))`` (``Q`` alone when ``weights`` is None)."""
        blocks = []
        for lam, Qs in spec:
            if len(Qs) == 1:
                Q = Qs[0] if weights is None else Qs[0] * weights(lam).unsqueeze(0)
                blocks.append(DenseLinearOperator(Q))
                continue
            kp = KroneckerProductLinearOperator(
                DenseLinearOperator(Qs[0]), DenseLinearOperator(Qs[1])
            )
            if weights is not None:
                kp = MatmulLinearOperator(kp, DiagLinearOperator(weights(lam).reshape(-1)))
            blocks.append(kp)
        return _BlockDiag(*blocks)

    def diagonalization(self, method: str | None = None):
        """Exact eigendecomposition from the factors' eigenbases.

        Args:
            method: Ignored (accepted for linear_operator compatibility); always exact.

        Returns:
            ``(eigenvalues, eigenvectors)``: `(P,)` eigenvalues, block by block (not sorted),
            and a lazy `(P, P)` orthogonal ``blockdiag(Q_A ⊗ Q_B, Q_C, ...)``.
        """
        return self._symeig(eigenvectors=True)

    def root_decomposition(self, method: str | None = None) -> RootLinearOperator:
        """Exact lazy root ``R = blockdiag((Q_A ⊗ Q_B) Λ^{1/2})`` with ``R Rᵀ = K``.

        Args:
            method: Ignored (accepted for linear_operator compatibility); always exact.

        Returns:
            A ``RootLinearOperator`` whose ``root`` is the lazy `(P, P)` ``R``.

        Raises:
            InputError: If ``K`` has a negative eigenvalue.
        """
        spec = self._shifted_spectrum()
        if any(bool((lam < 0).any()) for lam, _ in spec):
            raise InputError("root_decomposition() needs a positive semi-definite operator")
        return RootLinearOperator(self._eig_operator(spec, torch.sqrt))

    def root_inv_decomposition(self, initial_vectors=None, test_vectors=None, method=None):
        """Exact lazy inverse root ``R = blockdiag((Q_A ⊗ Q_B) Λ^{-1/2})`` with ``R Rᵀ = K⁻¹``.

        Args:
            initial_vectors: Ignored (linear_operator's Lanczos start; not needed here).
            test_vectors: Ignored (as ``initial_vectors``).
            method: Ignored; always exact.

        Returns:
            A ``RootLinearOperator`` whose ``root`` is the lazy `(P, P)` ``R``.

        Raises:
            InputError: If ``K`` is singular or not positive semi-definite.
        """
        spec = self._positive_spectrum("root_inv_decomposition()")
        return RootLinearOperator(self._eig_operator(spec, torch.rsqrt))

    # ------------------------------------------------------------------ algebra
    def _rebuild(self, factors: Sequence[Tensor]) -> _KronBase:
        """Same class and kwargs, new factors (subclasses rescale their shifts themselves)."""
        return type(self)(*factors, **self._kwargs)

    def _scaled_factors(self, c: Tensor) -> list[Tensor]:
        out = []
        for blk in self._blocks:
            out.append(blk[0] * c)
            out.extend(blk[1:])
        return out

    def _mul_constant(self, other: Tensor) -> LinearOperator:
        if bool((other >= 0).all()):
            return self._scaled(other.to(self.dtype))
        return super()._mul_constant(other)

    def _scaled(self, c: Tensor) -> _KronBase:
        return self._rebuild(self._scaled_factors(c))

    def add_diagonal(self, diag: Tensor | float, **options) -> LinearOperator:
        """``K + diag(d)``, exact whenever ``d`` is constant on every block.

        Args:
            diag: a scalar (or shape `(1,)`) for ``K + dI``, or a vector `(P,)`.
            **options: solver settings forwarded to
                :class:`~curvop.operators.kron_damped.KronAddedDiag` (``rtol``, ``max_iter``,
                ``dense_max``, ``num_probes``, ``seed``, ``precond_rank``) when the general path
                is taken.

        Returns:
            A :class:`~curvop.operators.kron_damped.DampedKron` (exact eigenbasis algorithms)
            when ``d`` is a scalar or constant on each block (and does not require grad), else a
            :class:`~curvop.operators.kron_damped.KronAddedDiag` (exact for small blocks,
            preconditioned CG / stochastic Lanczos quadrature for large ones). Never
            linear_operator's ``KroneckerProductAddedDiagLinearOperator``, which is wrong for
            non-constant diagonals.

        Raises:
            InputError: if ``diag`` has the wrong shape, device or non-finite entries.
        """
        from curvop.operators.kron_damped import route_added_diag

        return route_added_diag(self, diag, options)

    def add_jitter(self, jitter_val: float = 1e-3) -> LinearOperator:
        """``K + jitter_val · I``, solved exactly (see :meth:`add_diagonal`).

        Args:
            jitter_val: The multiple of the identity to add.

        Returns:
            A :class:`~curvop.operators.DampedKron`.
        """
        return self.add_diagonal(torch.as_tensor(jitter_val, dtype=self.dtype, device=self.device))

    def damped(self, delta: float | Tensor | Sequence[float]) -> LinearOperator:
        r"""``K + δI`` or, with one δ per block, ``K + blockdiag(δ_b I)``, solved exactly.

        .. math::
            A \otimes B + \delta I = (Q_A \otimes Q_B)(\Lambda_A \otimes \Lambda_B
            + \delta I)(Q_A \otimes Q_B)^\top

        Args:
            delta: a scalar, or a sequence / tensor of shape `(num_blocks,)`.

        Returns:
            A :class:`~curvop.operators.kron_damped.DampedKron` (a
            :class:`~curvop.operators.kron_damped.KronAddedDiag` if ``self`` already carries a
            non-constant diagonal).

        Raises:
            InputError: if ``delta`` has the wrong length or non-finite entries.
        """
        from curvop.operators.kron_damped import damp, per_block_delta

        return damp(self, per_block_delta(self, delta))

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator):
            return self.add_diagonal(other._diagonal())
        if isinstance(other, numbers.Number) and not isinstance(other, bool):
            if other == 0:
                return self
            raise InputTypeError(
                f"`{type(self).__name__} + {other}` would add {other} to every entry; to add "
                "a multiple of the identity use K.damped(delta) or K.add_jitter(delta)"
            )
        return super().__add__(other)


class Kron(_KronBase):
    r"""Kronecker-factored block-diagonal curvature (KFAC), a lazy `(P, P)` LinearOperator.

    .. math::
        K = \operatorname{blockdiag}_b(A_b \otimes B_b \text{ or } C_b)

    Blocks follow parameter order; ``A ⊗ B`` uses ``torch.kron`` order, so for a Linear weight of
    shape `(out, in)` flattened row-major, ``A`` is `(out, out)` and ``B`` is `(in, in)`.
    Factors must be symmetric (checked) and, for the spectral routines, positive semi-definite.

    Exact and lazy: ``K @ v`` (``A X Bᵀ`` per block), ``diagonal()``, ``solve``, ``logdet``,
    ``inv_quad_logdet``, ``root_decomposition``, ``eigh``; ``to_dense()`` materialises.
    ``logdet()`` of a singular ``K`` is ``-inf`` and ``solve`` raises; damp first:
    ``K.damped(δ)``, ``K.add_jitter(δ)`` or ``K.add_diagonal(d)`` (exact through the
    eigenbases). ``c * K`` (``c ≥ 0``) scales every ``A`` (or ``C``); ``K1 + K2`` is the exact
    sum as a ``SumLinearOperator`` (its solves use linear_operator's generic algorithms);
    :meth:`accumulate` adds factor-wise, the KFAC accumulation over batches.

    Args:
        kfacs: list of blocks, each ``[A, B]`` (block ``A ⊗ B``) or ``[C]`` (dense block);
            lists or tuples of square, symmetric, finite tensors of one dtype and device.
        layout: Internal: with the flat factors as positional arguments, the number of factors
            per block (see the note below). Leave it out.

    Raises:
        InputTypeError: if ``kfacs`` is not a list of lists of floating tensors, or dtypes differ.
        InputError: if a block holds 0 or more than 2 factors, a factor is not square, not
            symmetric or not finite, or factors are on different devices.

    Note:
        linear_operator rebuilds operators as ``cls(*self._args, **self._kwargs)``; here that is
        ``Kron(*flat_factors, layout=(2, 1, ...))``, the second (internal) calling form.
        Everything is differentiable w.r.t. the factors; the spectral routines (through
        ``eigh``) give the gradient along symmetric directions, ``(G + Gᵀ)/2``.

    Example:
        >>> import torch
        >>> from curvop import Kron
        >>> A, B, C = torch.eye(2), 2 * torch.eye(3), torch.eye(2)
        >>> K = Kron([[A, B], [C]])
        >>> K.shape
        torch.Size([8, 8])
        >>> bool(torch.allclose(K.to_dense(), torch.block_diag(torch.kron(A, B), C)))
        True
        >>> round(float(K.damped(1.0).logdet()), 4)  # 6 log 3 + 2 log 2
        7.978
    """

    def __init__(self, *args, kfacs: Sequence | None = None, layout: Sequence[int] | None = None):
        if kfacs is not None:
            args = (kfacs, *args)
        if layout is None:
            if len(args) != 1:
                raise InputTypeError(
                    "Kron takes one argument `kfacs` (a list of [A, B] / [C] blocks); "
                    f"got {len(args)}"
                )
            args, layout = _flatten_kfacs(args[0])
        super().__init__(*args, layout=layout)

    def accumulate(self, other: Kron) -> Kron:
        """Factor-wise sum ``[[A1 + A2, B1 + B2], [C1 + C2], ...]``: KFAC accumulation over batches.

        This is what laplace-torch's ``Kron.__add__`` does. It is *not* ``self + other``
        (``A1 ⊗ B1 + A2 ⊗ B2 ≠ (A1 + A2) ⊗ (B1 + B2)``); use ``+`` for the exact sum.

        Args:
            other: A :class:`Kron` with the same blocks and factor shapes.

        Returns:
            A new :class:`Kron` (neither operand is changed).

        Raises:
            InputTypeError: if ``other`` is not a :class:`Kron`.
            InputError: if the block structures or factor shapes differ.
        """
        if not isinstance(other, Kron):
            raise InputTypeError(f"`other` must be a Kron; got {type(other).__name__}")
        mine = [tuple(F.shape) for F in self._factors]
        theirs = [tuple(F.shape) for F in other._factors]
        if self._layout != other._layout or mine != theirs:
            raise InputError(
                f"`other` must have the same blocks as self (layout {self._layout}, factor shapes "
                f"{mine}); got layout {other._layout}, factor shapes {theirs}"
            )
        return Kron(*(F + G for F, G in zip(self._factors, other._factors)), layout=self._layout)
