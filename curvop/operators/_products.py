r"""Linearise once, multiply many times: the products behind the model-backed operators.

A :class:`SqrtFormProducts` (GGN, MC Fisher, EF) keeps the autograd graph of one forward pass
and of one backward pass made differentiable in its cotangent ``u``:
:math:`u \mapsto J^\top u` is linear, so differentiating it once more in ``u`` gives
:math:`v \mapsto J v`. A product :math:`J^\top S S^\top J v` is then two backward passes through
cached graphs — no new forward — which is also what makes it work for modules without
forward-mode AD (``nn.LSTM`` on CPU). Where double backward is missing, the products switch to
``torch.func.jvp`` (a fresh forward with tangents) plus the cached backward.

Lean layers. torch's double backward of a layer's backward computes every derivative of it —
with respect to the cotangent, *and* to the layer's input and weight — whether or not they are
asked for: for a convolution that is two extra convolutions per layer (``convT(gO, ggW)`` and
``conv(ggI, gO)``) on top of the two that :math:`J v` needs, and for ``layer_norm`` or an
eval-mode ``batch_norm`` a long chain of elementwise terms. Only the derivative in ``u`` is ever
taken of the cached ``Jᵀu`` graph, so while that graph is recorded (and only then), a
``TorchFunctionMode`` routes ``conv1d/2d/3d``, ``layer_norm`` and eval-mode ``batch_norm``
through :class:`_LeanOp`: the same forward and first backward (torch's kernels), and a second
backward that is the layer's forward-mode derivative at the cached inputs — ``conv(ggI, W) +
conv(x, ggW) + ggb`` — and nothing else. Its derivatives in the cached inputs are left out on
purpose; the Hessian (:class:`HessianProducts`), which needs them, never uses this mode.

:class:`HessianProducts` caches :math:`\nabla_\theta \ell` with its graph; each product is one
backward through it (reverse-over-reverse), or forward-over-reverse with ``torch.func`` where that
fails.

Written by hand because ``torch.func.linearize`` traces the whole forward with ``make_fx`` (a cost
of many products, and it fails on data-dependent control flow) and recomputes nothing cheaper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, jvp, vmap
from torch.overrides import TorchFunctionMode

from curvop import _autograd
from curvop._functional import Batch

__all__ = ["SqrtFormProducts", "HessianProducts"]


def _leaves(batch: Batch) -> list[Tensor]:
    return [t.detach().requires_grad_() for t in batch.theta]


def _grad(outputs, inputs, grad_outputs, **kwargs):
    """``torch.autograd.grad`` over a leading batch of cotangents; one column without vmap."""
    k = grad_outputs[0].shape[0] if isinstance(grad_outputs, (list, tuple)) else \
        grad_outputs.shape[0]
    if k == 1:
        many = isinstance(grad_outputs, (list, tuple))
        squeeze = [g[0] for g in grad_outputs] if many else [grad_outputs[0]]
        out = _autograd.grad(outputs if isinstance(outputs, (list, tuple)) else [outputs],
                             inputs if isinstance(inputs, (list, tuple)) else [inputs],
                             squeeze, **kwargs)
        return [None if o is None else o.unsqueeze(0) for o in out]
    return torch.autograd.grad(outputs, inputs, grad_outputs, is_grads_batched=True, **kwargs)


# --------------------------------------------------------------------------- lean layers
class _Conv:
    """``conv{d}d`` with integer padding: forward, VJP and JVP at fixed inputs."""

    def __init__(self, d: int, stride, padding, dilation, groups: int) -> None:
        def tup(v) -> list[int]:
            return [int(v)] * d if isinstance(v, int) else [int(e) for e in v]

        self.d, self.groups = d, int(groups)
        self.stride, self.padding, self.dilation = tup(stride), tup(padding), tup(dilation)

    def _conv(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return torch.ops.aten.convolution(x, w, b, self.stride, self.padding, self.dilation,
                                          False, [0] * self.d, self.groups)

    def forward(self, args: Sequence[Tensor | None]) -> tuple[Tensor, tuple]:
        out = self._conv(*args)
        self.out_shape = out.shape
        return out, ()

    def vjp(self, args, extra, g: Tensor, needs) -> list[Tensor | None]:
        x, w, b = args
        mask = [bool(needs[0]), bool(needs[1]), bool(needs[2]) and b is not None]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x, w, None if b is None else [b.shape[0]], self.stride, self.padding,
            self.dilation, False, [0] * self.d, self.groups, mask)
        return [gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None]

    def jvp(self, args, extra, tangents) -> Tensor | None:
        x, w, _ = args
        dx, dw, db = tangents
        out = None
        if dx is not None:
            out = self._conv(dx, w, None)
        if dw is not None:
            t = self._conv(x, dw, None)
            out = t if out is None else out + t
        if db is not None:
            t = db.reshape(-1, *[1] * self.d)
            out = t.expand(self.out_shape) if out is None else out + t
        return out


class _LayerNorm:
    """``layer_norm``: forward (torch's kernel), VJP (torch's), JVP at fixed inputs."""

    def __init__(self, normalized_shape, eps: float) -> None:
        self.shape = [int(normalized_shape)] if isinstance(normalized_shape, int) else \
            [int(s) for s in normalized_shape]
        self.eps = float(eps)

    def forward(self, args):
        x, w, b = args
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, self.shape, w, b, self.eps)
        return out, (mean, rstd)

    def vjp(self, args, extra, g, needs):
        x, w, b = args
        mean, rstd = extra
        mask = [bool(needs[0]), bool(needs[1]) and w is not None,
                bool(needs[2]) and b is not None]
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(g, x, self.shape, mean, rstd,
                                                               w, b, mask)
        return [gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None]

    def jvp(self, args, extra, tangents):
        x, w, _ = args
        mean, rstd = extra
        dx, dw, db = tangents
        dims = tuple(range(-len(self.shape), 0))
        xhat = (x - mean) * rstd
        out = None
        if dx is not None:
            out = (dx - dx.mean(dims, keepdim=True)
                   - xhat * (dx * xhat).mean(dims, keepdim=True)) * rstd
            if w is not None:
                out = out * w
        if dw is not None:
            t = xhat * dw
            out = t if out is None else out + t
        if db is not None:
            out = db.expand_as(x) if out is None else out + db
        return out


class _BatchNormEval:
    """Eval-mode ``batch_norm`` (running statistics): a fixed per-channel affine map."""

    def __init__(self, func, args, kwargs, eps: float) -> None:
        self.func, self.args, self.kwargs, self.eps = func, args, kwargs, float(eps)

    def forward(self, args):
        x, w, b, rm, rv = args
        return self.func(*self.args, **self.kwargs), ()

    @staticmethod
    def _channel(t: Tensor, x: Tensor) -> Tensor:
        return t.reshape(-1, *[1] * (x.dim() - 2))

    def _xhat(self, x, rm, istd):
        return (x - self._channel(rm, x)) * self._channel(istd, x)

    def vjp(self, args, extra, g, needs):
        x, w, b, rm, rv = args
        istd = torch.rsqrt(rv + self.eps)
        dims = [0, *range(2, x.dim())]
        gx = gw = gb = None
        if needs[0]:
            gx = g * self._channel(istd if w is None else istd * w, x)
        if needs[1] and w is not None:
            gw = (g * self._xhat(x, rm, istd)).sum(dims)
        if needs[2] and b is not None:
            gb = g.sum(dims)
        return [gx, gw, gb, None, None]

    def jvp(self, args, extra, tangents):
        x, w, b, rm, rv = args
        dx, dw, db = tangents[:3]
        istd = torch.rsqrt(rv + self.eps)
        out = None
        if dx is not None:
            out = dx * self._channel(istd if w is None else istd * w, x)
        if dw is not None:
            t = self._xhat(x, rm, istd) * self._channel(dw, x)
            out = t if out is None else out + t
        if db is not None:
            t = self._channel(db, x)
            out = t.expand_as(x) if out is None else out + t
        return out


class _LeanOp(torch.autograd.Function):
    """A layer whose backward is differentiable in its cotangent only (see the module doc)."""

    @staticmethod
    def forward(ctx, spec, *args):
        out, extra = spec.forward(args)
        ctx.spec, ctx.n = spec, len(args)
        ctx.save_for_backward(*args, *extra)
        return out

    @staticmethod
    def backward(ctx, g):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():  # create_graph: the backward must be differentiable in g
            grads = iter(_LeanVJP.apply(ctx.spec, ctx.n, needs, g, *saved))
            return (None, *[next(grads) if nd else None for nd in needs])
        return (None, *ctx.spec.vjp(saved[:ctx.n], saved[ctx.n:], g, needs))


class _LeanVJP(torch.autograd.Function):
    """The VJP of a :class:`_LeanOp`; its backward is the layer's JVP (in ``g`` only)."""

    @staticmethod
    def forward(ctx, spec, n, needs, g, *saved):
        grads = spec.vjp(saved[:n], saved[n:], g, needs)
        ctx.spec, ctx.n, ctx.needs = spec, n, needs
        ctx.save_for_backward(*saved)
        ctx.set_materialize_grads(False)
        return tuple(gr for gr, nd in zip(grads, needs) if nd)

    @staticmethod
    def backward(ctx, *gg):
        saved = ctx.saved_tensors
        it = iter(gg)
        tangents = [next(it) if nd else None for nd in ctx.needs]
        dg = ctx.spec.jvp(saved[:ctx.n], saved[ctx.n:], tangents)
        return (None, None, None, dg, *[None] * len(saved))


_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def _conv_args(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return input, weight, bias, stride, padding, dilation, groups


def _layer_norm_args(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return input, normalized_shape, weight, bias, eps


def _batch_norm_args(input, running_mean, running_var, weight=None, bias=None,
                     training=False, momentum=0.1, eps=1e-5):
    return input, running_mean, running_var, weight, bias, training, eps


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _LeanLayers(TorchFunctionMode):
    """While recording the ``Jᵀu`` graph: layers through :class:`_LeanOp` (see the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONVS:
            x, w, b, stride, padding, dilation, groups = _conv_args(*args, **kwargs)
            d = _CONVS[func]
            if not isinstance(padding, str) and x.dim() == d + 2 and _wants_grad(x, w, b):
                return _LeanOp.apply(_Conv(d, stride, padding, dilation, groups), x, w, b)
        elif func is F.layer_norm:
            x, shape, w, b, eps = _layer_norm_args(*args, **kwargs)
            if _wants_grad(x, w, b):
                return _LeanOp.apply(_LayerNorm(shape, eps), x, w, b)
        elif func is F.batch_norm:
            x, rm, rv, w, b, training, eps = _batch_norm_args(*args, **kwargs)
            if (not training and rm is not None and rv is not None and x.dim() >= 2
                    and not rm.requires_grad and not rv.requires_grad and _wants_grad(x, w, b)):
                spec = _BatchNormEval(func, args, kwargs, eps)
                return _LeanOp.apply(spec, x, w, b, rm, rv)
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- products
class SqrtFormProducts:
    r"""Products with :math:`\sum_n J_n^\top S_n S_n^\top J_n` for one batch.

    Args:
        batch: The batch (model, inputs, outputs).
        S: Square-root columns `(B, C, K)`, fixed for the life of the object.
    """

    def __init__(self, batch: Batch, S: Tensor) -> None:
        self.batch = batch
        self.S = S.detach()
        # Λ = S Sᵀ `(B, C, C)` once (one product per application, C² per sample), unless the
        # square root is thin enough for two products through it to cost less (2CK < C²: the
        # MC Fisher and the EF; the exact root has K = C - 1)
        B, C, K = self.S.shape
        self.Lam = self.S @ self.S.transpose(1, 2) if 2 * K >= C else None
        self.theta = _leaves(batch)
        with torch.enable_grad():
            with _LeanLayers():
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
        # several columns at once, or one by one: on CPU by the layers in the graph; on a GPU
        # always at once, where a loop is bound by kernel launches (H100, matmat16: the CNN
        # 15 ms batched against 42 ms looped, the transformer 13 against 75 ms)
        self.batched = self.f.device.type != "cpu" or _batch_friendly(self.f)

    def _jv(self, V: tuple[Tensor, ...]) -> Tensor:
        """``J v`` for tangents ``V`` `(k, *shape)` per parameter: `(k, B, C)`."""
        if self.mode == "reverse":
            try:
                with torch.enable_grad():
                    return _grad([t for _, t in self.jtu], self.u, [V[i] for i, _ in self.jtu],
                                 retain_graph=True)[0]
            except RuntimeError:
                if V[0].shape[0] > 1:  # the batching rule may be what is missing
                    return torch.cat([self._jv(tuple(t[i: i + 1] for t in V))
                                      for i in range(V[0].shape[0])])
                self.mode = "forward"  # double backward is missing
        fm, x, theta = self.batch.fm, self.batch.x, tuple(self.batch.theta)

        def jv(v: tuple[Tensor, ...]) -> Tensor:
            return jvp(lambda th: fm(th, x), (theta,), (v,))[1]

        return vmap(jv, randomness="same")(V)

    def _jtu(self, U: Tensor) -> list[Tensor]:
        with torch.enable_grad():
            try:
                out = _grad(self.f, self.theta, U, retain_graph=True, allow_unused=True)
            except RuntimeError:
                if U.shape[0] == 1:
                    raise
                cols = [self._jtu(U[i: i + 1]) for i in range(U.shape[0])]
                return [torch.cat(c) for c in zip(*cols)]
        return [o if o is not None else U.new_zeros(U.shape[0], *p.shape)
                for o, p in zip(out, self.theta)]

    def _output_hessian(self, JV: Tensor) -> Tensor:
        """``S Sᵀ`` applied per sample to ``JV`` `(k, B, C)`."""
        W = JV.transpose(0, 1)  # (B, k, C)
        if self.Lam is not None:
            return torch.bmm(W, self.Lam).transpose(0, 1)  # Λ symmetric
        return torch.bmm(torch.bmm(W, self.S), self.S.transpose(1, 2)).transpose(0, 1)

    def _matmat(self, V: Tensor) -> Tensor:
        b = self.batch
        JV = self._jv(b.unflat_columns(V))
        return b.flat(self._jtu(self._output_hessian(JV)), 1).detach()

    def _columns(self, V: Tensor) -> Tensor:
        return torch.cat([self._matmat(V[i: i + 1]) for i in range(V.shape[0])])

    def matmat(self, V: Tensor) -> Tensor:
        """Rows of ``V`` `(k, P)` (selected space) times the curvature: `(k, P)`.

        Several columns go through the cached graphs at once (``vmap`` over the cotangents:
        larger matrix products, a win for MLPs on CPU), or one by one where the graph holds
        layers whose batching rules copy their operands (convolution, pooling, batched matrix
        products as in attention, recurrent layers; see :func:`_batch_friendly`) on CPU.
        """
        if V.shape[0] == 1 or self.batched:
            return self._matmat(V)
        return self._columns(V)


_UNBATCHED = ("Convolution", "Pool", "Bmm", "Rnn", "Lstm", "Gru", "Cudnn", "Mkldnn")


def _batch_friendly(out: Tensor) -> bool:
    """Whether ``vmap`` over cotangents beats a loop for the graph of ``out``.

    True unless a node's name contains one of :data:`_UNBATCHED` or it is a lean convolution.
    """
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        name = type(fn).__name__
        if any(k in name for k in _UNBATCHED) or isinstance(getattr(fn, "spec", None), _Conv):
            return False
        todo.extend(f for f, _ in fn.next_functions)
    return True


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
