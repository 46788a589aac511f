r"""Curvatures of the form :math:`\sum_n J_n^\top S_n S_n^\top J_n` — one implementation.

The exact GGN (``S`` a square root of Λ), the Monte-Carlo Fisher (``S`` sampled output
gradients over :math:`\sqrt{K}`) and the empirical Fisher (``S`` the output gradient
:math:`r_n = \partial \ell_n / \partial f_n`, since :math:`g_n = J_n^\top r_n`) differ only in
``S`` `(B, C, K)`; their diagonal and dense forms live here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from curvop._functional import Batch, PendingBatch
from curvop._gram import gram_of_rows
from curvop._taps import tap_layers
from curvop.layers import diag_sq_sum

__all__ = ["sqrt_vjp_chunks", "sqrt_form_diag", "sqrt_form_full", "ef_sqrt"]


def ef_sqrt(batch: Batch) -> Tensor:
    """The EF's ``S``: output gradients of each sample's loss, `(B, C, 1)`."""
    return batch.likelihood.output_gradient(batch.f.detach(), batch.y).unsqueeze(-1)


def sqrt_vjp_chunks(batch: Batch, S: Tensor) -> Iterator[Tensor]:
    """Yield ``S_nᵀ J_n`` `(n, K, P)` over chunks of samples (per-sample VJPs)."""
    K = S.shape[-1]
    for rows in batch.sample_chunks(3 * K * batch.sel.num_live * batch.itemsize):
        yield batch.sqrt_vjps(rows, S[rows])


def sqrt_form_diag(batch: Batch | PendingBatch, S: Tensor | Callable[[Batch], Tensor],
                   verified: set | None = None) -> Tensor:
    """The exact diagonal `(P,)`.

    Layer by layer: closed form for the layers with taps (Linear, Conv, attention projections:
    squares of per-sample gradients from layer inputs and backpropagated columns of ``S``, see
    :mod:`curvop._taps`), per-sample VJPs in the remaining parameters only (LayerNorm, custom
    modules, tied weights) — a LayerNorm in an MLP does not send the whole network down the
    per-sample path. A :class:`~curvop._functional.PendingBatch` gets its outputs from the
    tapped forward pass, and ``S`` (then a function of the completed batch) from them.
    """
    if callable(S) and not isinstance(batch, PendingBatch):
        S = S(batch)
    taps, unhandled = tap_layers(batch, S, verified, partial=True)
    if isinstance(batch, PendingBatch):
        batch, S = batch.settled(S)
    parts: list[Tensor | None] = [None] * len(batch.theta)
    for t in taps:
        sq = diag_sq_sum(t.a, t.g, t.has_bias)
        for slot, d in zip(t.param_slots, sq if t.has_weight else sq[1:]):
            parts[slot] = d
    rest = sorted({s for u in unhandled for s in u.param_slots}
                  | {i for i, p in enumerate(parts) if p is None})
    if rest:
        K = S.shape[-1]
        live = sum(batch.theta[i].numel() for i in rest)
        per_sample = 3 * K * (live + batch.x[:1].numel() + batch.f.shape[-1]) * batch.itemsize
        for i in rest:
            parts[i] = batch.theta[i].new_zeros(batch.theta[i].shape)
        for rows in batch.sample_chunks(per_sample):
            for i, M in zip(rest, batch.sqrt_vjps_live(rows, S[rows], rest)):
                parts[i] += M.square().sum((0, 1))
    return batch.flat(parts, 0)


def sqrt_form_full(batch: Batch, S: Tensor) -> Tensor:
    """The dense matrix `(P, P)` as the Gram matrix of the per-sample products, chunked."""
    return gram_of_rows(sqrt_vjp_chunks(batch, S), batch.f, batch.sel.num_params)


def output_hessian_product(S: Tensor):
    """``V`` `(k, B, C)` ↦ ``S Sᵀ V`` per sample: the Λ of a square-root form."""

    def apply(V: Tensor) -> Tensor:
        return torch.einsum("bck,bdk,nbd->nbc", S, S, V)

    return apply
