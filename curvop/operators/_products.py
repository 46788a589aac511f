r"""Linearise once, multiply many times: the products behind the model-backed operators.

A :class:`SqrtFormProducts` (GGN, MC Fisher, EF) keeps the autograd graph of one forward pass
and of one backward pass made differentiable in its cotangent ``u``:
:math:`u \mapsto J^\top u` is linear, so differentiating it once more in ``u`` gives
:math:`v \mapsto J v`. A product :math:`J^\top S S^\top J v` is then two backward passes through
cached graphs — no new forward — which is also what makes it work for modules without
forward-mode AD (``nn.LSTM`` on CPU). Where double backward is missing, the products switch to
``torch.func.jvp`` (a fresh forward with tangents) plus the cached backward.

:class:`HessianProducts` caches :math:`\nabla_\theta \ell` with its graph; each product is one
backward through it (reverse-over-reverse), or forward-over-reverse with ``torch.func`` where that
fails.

Written by hand because ``torch.func.linearize`` traces the whole forward with ``make_fx`` (a cost
of many products, and it fails on data-dependent control flow) and recomputes nothing cheaper.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from curvop._functional import Batch

__all__ = ["SqrtFormProducts", "HessianProducts"]


def _leaves(batch: Batch) -> list[Tensor]:
    return [t.detach().requires_grad_() for t in batch.theta]


def _grad(outputs, inputs, grad_outputs, **kwargs):
    """``torch.autograd.grad`` over a leading batch of cotangents; one column without vmap."""
    k = grad_outputs[0].shape[0] if isinstance(grad_outputs, (list, tuple)) else \
        grad_outputs.shape[0]
    if k == 1:
        squeeze = ([g[0] for g in grad_outputs] if isinstance(grad_outputs, (list, tuple))
                   else grad_outputs[0])
        out = torch.autograd.grad(outputs, inputs, squeeze, **kwargs)
        return [None if o is None else o.unsqueeze(0) for o in out]
    return torch.autograd.grad(outputs, inputs, grad_outputs, is_grads_batched=True, **kwargs)


class SqrtFormProducts:
    r"""Products with :math:`\sum_n J_n^\top S_n S_n^\top J_n` for one batch.

    Args:
        batch: The batch (model, inputs, outputs).
        S: Square-root columns `(B, C, K)`, fixed for the life of the object.
    """

    def __init__(self, batch: Batch, S: Tensor) -> None:
        self.batch = batch
        self.S = S.detach()
        self.theta = _leaves(batch)
        with torch.enable_grad():
            self.f = batch.fm(self.theta, batch.x)
            self.u = torch.zeros_like(self.f, requires_grad=True)
            try:
                jtu = torch.autograd.grad(self.f, self.theta, self.u, create_graph=True,
                                          allow_unused=True)
                # parameters the outputs do not depend on contribute nothing to J v
                self.jtu = [(i, t) for i, t in enumerate(jtu)
                            if t is not None and t.requires_grad]
                self.mode = "reverse" if self.jtu else "forward"
            except RuntimeError:
                self.jtu, self.mode = [], "forward"

    def _jv(self, V: tuple[Tensor, ...]) -> Tensor:
        """``J v`` for tangents ``V`` `(k, *shape)` per parameter: `(k, B, C)`."""
        if self.mode == "reverse":
            try:
                with torch.enable_grad():
                    return _grad([t for _, t in self.jtu], self.u, [V[i] for i, _ in self.jtu],
                                 retain_graph=True)[0]
            except RuntimeError:
                self.mode = "forward"  # double backward or its batching rule is missing
        fm, x, theta = self.batch.fm, self.batch.x, tuple(self.batch.theta)

        def jv(v: tuple[Tensor, ...]) -> Tensor:
            return jvp(lambda th: fm(th, x), (theta,), (v,))[1]

        return vmap(jv, randomness="same")(V)

    def _jtu(self, U: Tensor) -> list[Tensor]:
        with torch.enable_grad():
            out = _grad(self.f, self.theta, U, retain_graph=True, allow_unused=True)
        return [o if o is not None else U.new_zeros(U.shape[0], *p.shape)
                for o, p in zip(out, self.theta)]

    def matmat(self, V: Tensor) -> Tensor:
        """Rows of ``V`` `(k, P)` (selected space) times the curvature: `(k, P)`."""
        b = self.batch
        JV = self._jv(b.unflat_columns(V))
        U = torch.einsum("bck,bdk,nbd->nbc", self.S, self.S, JV)
        return b.flat(self._jtu(U), 1).detach()


class HessianProducts:
    r"""Products with :math:`\nabla^2_\theta \ell` for one batch."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.theta = _leaves(batch)
        with torch.enable_grad():
            loss = batch.likelihood.loss(batch.fm(self.theta, batch.x), batch.y)
            g = torch.autograd.grad(loss, self.theta, create_graph=True, allow_unused=True)
        # entries without a graph have a zero Hessian row and add nothing to a product
        self.g = [(i, t) for i, t in enumerate(g) if t is not None and t.requires_grad]
        self.mode = "reverse" if self.g else "forward"

    def matmat(self, V: Tensor) -> Tensor:
        """Rows of ``V`` `(k, P)` times the Hessian: `(k, P)`."""
        b = self.batch
        tangents = b.unflat_columns(V)
        if self.mode == "reverse":
            try:
                with torch.enable_grad():
                    out = _grad([t for _, t in self.g], self.theta,
                                [tangents[i] for i, _ in self.g], retain_graph=True,
                                allow_unused=True)
                out = [o if o is not None else V.new_zeros(V.shape[0], *p.shape)
                       for o, p in zip(out, self.theta)]
                return b.flat(out, 1).detach()
            except RuntimeError:
                self.mode = "forward"
        theta = tuple(b.theta)

        def loss_fn(th: tuple[Tensor, ...]) -> Tensor:
            return b.likelihood.loss(b.fm(th, b.x), b.y)

        def hvp(v: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return jvp(grad(loss_fn), (theta,), (v,))[1]

        return b.flat(vmap(hvp, randomness="same")(tangents), 1)
