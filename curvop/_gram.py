"""Exactly symmetric Gram matrices ``X Xᵀ`` at about half the flops on CPU.

Shared by the Kronecker factors (:mod:`curvop.kfac`) and the dense square-root-form curvatures
(:func:`curvop._sqrt_form.sqrt_form_full`). Written by hand because torch exposes no symmetric
rank-k update (BLAS ``syrk``): on CPU a large product is computed block row by block row of its
upper triangle (one GEMM per block row, about ``(nb + 1) / (2 nb)`` of the flops for ``nb``
blocks) and mirrored once at the end; on other devices, or for small products, it is one GEMM.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["gram", "gram_of_rows", "gram_upper_", "mirror_upper_", "symmetrized"]

#: a Gram matrix on CPU is split into block rows of about this many rows (64 rather than 128:
#: a 256-row Gram of 1,152 columns, KFAC's output factor of a 256-unit layer with 9 columns
#: per sample at batch 128, takes 3.35 ms in 4 block rows against 3.86 ms in 2 and 4.25 ms as
#: one GEMM, on one thread of the 2-core AMD EPYC; larger Grams are capped below anyway)
GRAM_BLOCK = 64
#: columns per step of :func:`mirror_upper_` (transposed copies: 1.0 ms for a 784-row matrix
#: in steps of 128 against 1.4 ms in steps of 64)
MIRROR_BLOCK = 128
#: rows from which a strided `(d, b·m)` operand is copied for :func:`gram` rather than summed
#: as `b` batched products (see :func:`curvop.kfac._gram_sum`)
GRAM_COPY_ROWS = 256
#: ... when it costs at least this many flops (smaller ones are one GEMM)
GRAM_SPLIT_FLOPS = 5e7
#: ... into at most this many block rows: 9/16 of the flops, and each GEMM stays large (a
#: 16,002-row Gram of 640 columns: 5.5 s in 8 block rows, 6.3 s in 16, 14.8 s as one GEMM, on
#: one thread of the 2-core AMD EPYC)
GRAM_MAX_BLOCKS = 8
#: matrices up to this many rows are made symmetric with one cached upper-triangle mask
#: (one kernel instead of an addition and a scaling; the mask costs a byte per entry)
MASK_ROWS = 1024


@functools.lru_cache(maxsize=32)
def _upper_mask(d: int, device: torch.device) -> Tensor:
    """`(d, d)` bool, true on and above the diagonal (cached: made once per size and device)."""
    return torch.ones(d, d, dtype=torch.bool, device=device).triu_()


def symmetrized(F: Tensor) -> Tensor:
    """A new, exactly symmetric `(d, d)` matrix from ``F``, which is symmetric up to rounding.

    Small matrices take ``F``'s upper triangle mirrored below the diagonal (one ``where``
    kernel: a GPU is bound by launches there), large ones ``(F + Fᵀ) / 2``.
    """
    d = F.shape[0]
    if d <= MASK_ROWS:
        return torch.where(_upper_mask(d, F.device), F, F.mT)
    return (F + F.mT).mul_(0.5)


def _block_size(X: Tensor) -> int:
    """Rows per block row for ``X`` `(d, m)`; ``d`` means one GEMM."""
    d, m = X.shape
    if X.device.type == "cpu" and 2.0 * m * d * d >= GRAM_SPLIT_FLOPS:
        nb = min(max(1, round(d / GRAM_BLOCK)), GRAM_MAX_BLOCKS)
        return -(-d // nb)
    return d


def gram_upper_(out: Tensor, X: Tensor, overwrite: bool = False, alpha: float = 1.0) -> Tensor:
    """Add ``X Xᵀ`` to ``out`` `(d, d)` at least on and above the diagonal blocks.

    Below the diagonal blocks ``out`` is left stale where the product was split; call
    :func:`mirror_upper_` once after the last addition. ``X`` `(d, m)` may have any strides.
    With ``overwrite`` the product replaces what ``out`` held (``beta = 0``: an uninitialised
    ``out``, even one holding nan, needs no zero fill first). ``alpha`` scales the product.
    """
    d = X.shape[0]
    bs = _block_size(X)
    beta = 0 if overwrite else 1
    if bs >= d:
        return out.addmm_(X, X.mT, beta=beta, alpha=alpha)
    for i0 in range(0, d, bs):
        out[i0:i0 + bs, i0:].addmm_(X[i0:i0 + bs], X[i0:].mT, beta=beta, alpha=alpha)
    return out


def mirror_upper_(out: Tensor, block: int = MIRROR_BLOCK) -> Tensor:
    """Make ``out`` `(d, d)` exactly symmetric by copying its upper triangle below the diagonal.

    Only the upper triangle (diagonal included) is read, so any block-row split of
    :func:`gram_upper_` works.

    Args:
        out: The matrix, changed in place.
        block: Columns copied per step.

    Returns:
        ``out``.
    """
    d = out.shape[0]
    for i0 in range(0, d, block):
        i1 = min(d, i0 + block)
        D = out[i0:i1, i0:i1]
        D.copy_(D.triu() + D.triu(1).mT)
        if i1 < d:
            out[i1:, i0:i1] = out[i0:i1, i1:].mT
    return out


def gram(X: Tensor, out: Tensor | None = None, alpha: float = 1.0) -> Tensor:
    """``alpha X Xᵀ`` for ``X`` `(d, m)` (any strides), exactly symmetric; added to ``out``.

    ``out`` is optional; the scaling is the GEMM's own (no separate kernel).
    """
    d = X.shape[0]
    if _block_size(X) >= d:
        F = X @ X.mT if alpha == 1.0 else X.new_empty(d, d).addmm_(X, X.mT, beta=0, alpha=alpha)
        F = symmetrized(F)
        return F if out is None else out.add_(F)
    if out is None:
        return mirror_upper_(gram_upper_(X.new_empty(d, d), X, overwrite=True, alpha=alpha))
    return mirror_upper_(gram_upper_(out, X, alpha=alpha))


def gram_of_rows(chunks: Iterable[Tensor], like: Tensor, P: int) -> Tensor:
    """``Σ Mᵀ M`` `(P, P)` over chunks of rows ``M`` `(..., P)`, exactly symmetric.

    The dense GGN / Fisher / EF of every backend is this sum over chunks of per-sample rows;
    the mirror is done once, after the last chunk. ``like`` gives the dtype and device.
    """
    H = None
    for M in chunks:
        if H is None:
            H = gram_upper_(like.new_empty(P, P), M.reshape(-1, P).mT, overwrite=True)
        else:
            gram_upper_(H, M.reshape(-1, P).mT)
    return like.new_zeros(P, P) if H is None else mirror_upper_(H)
