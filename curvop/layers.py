r"""Layers with a closed form: Linear and Conv1d/2d/3d, as ``(inputs, output gradients)`` pairs.

For such a layer the gradient of sample ``n`` in the weight is a sum over weight-sharing positions
``t`` (tokens, pixels) of outer products,

.. math::

    \nabla_W \ell_n = \sum_t g_{n,t} a_{n,t}^\top, \qquad \nabla_b \ell_n = \sum_t g_{n,t},

with ``a`` the (unfolded) layer input `(n, T, I)` and ``g`` the gradient in the layer output
`(n, T, O)`. Every structure that exploits layers — the exact diagonal's closed form, Kronecker
factors — works on these two tensors. Handlers are looked up along ``type(module).__mro__``, so
subclasses of ``nn.Linear`` / ``nn.ConvNd`` are handled too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LayerHandler", "handler_for", "HANDLERS", "per_sample_grads", "summed_grads",
           "diag_sq_sum", "unfold"]


@dataclass(frozen=True)
class LayerHandler:
    """How to see a layer as ``(a, g)`` pairs.

    Attributes:
        inputs: Maps ``(module, input)`` to ``a`` `(n, G, T, I)` (``G`` groups, 1 but for grouped
            convolutions; ``I`` includes the kernel positions).
        outputs: Maps ``(module, output-like)`` to `(n, G, T, O/G)`.
    """

    inputs: Callable[[nn.Module, Tensor], Tensor]
    outputs: Callable[[nn.Module, Tensor], Tensor]
    supported: Callable[[nn.Module], bool] = lambda m: True


def _linear_inputs(module: nn.Linear, a: Tensor) -> Tensor:
    return a.reshape(a.shape[0], 1, -1, a.shape[-1])


def _linear_outputs(module: nn.Linear, g: Tensor) -> Tensor:
    return g.reshape(g.shape[0], 1, -1, g.shape[-1])


def _conv_dims(module: nn.Module) -> int:
    return len(module.kernel_size)


def unfold(module: nn.Module, x: Tensor) -> Tensor:
    """Unfold the input of a convolution: `(n, C_in, *spatial)` → `(n, C_in·k, T)`.

    Written by hand because ``torch.nn.functional.unfold`` only covers 2-D: a convolution with a
    one-hot kernel per (channel, kernel position) extracts the patches in any dimension, with
    the module's padding, stride and dilation (the trick behind unfoldNd).
    """
    d = _conv_dims(module)
    C = x.shape[1]
    k = math.prod(module.kernel_size)
    eye = torch.eye(k, dtype=x.dtype, device=x.device).reshape(k, 1, *module.kernel_size)
    weight = eye.repeat(C, 1, *([1] * d))
    conv = getattr(torch.nn.functional, f"conv{d}d")
    patches = conv(x, weight, stride=module.stride, padding=module.padding,
                   dilation=module.dilation, groups=C)
    return patches.reshape(x.shape[0], C * k, -1)


def _conv_inputs(module: nn.Module, x: Tensor) -> Tensor:
    G = module.groups
    u = unfold(module, x)  # (n, C_in*k, T) with channel-major rows
    n, _, T = u.shape
    return u.reshape(n, G, -1, T).transpose(2, 3)


def _conv_outputs(module: nn.Module, g: Tensor) -> Tensor:
    n, G = g.shape[0], module.groups
    return g.reshape(n, G, g.shape[1] // G, -1).transpose(2, 3)


def _conv_supported(module: nn.Module) -> bool:
    return module.padding_mode == "zeros" and not isinstance(module.padding, str)


HANDLERS: dict[type, LayerHandler] = {
    nn.Linear: LayerHandler(_linear_inputs, _linear_outputs),
    nn.Conv1d: LayerHandler(_conv_inputs, _conv_outputs, _conv_supported),
    nn.Conv2d: LayerHandler(_conv_inputs, _conv_outputs, _conv_supported),
    nn.Conv3d: LayerHandler(_conv_inputs, _conv_outputs, _conv_supported),
}


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of ``module``'s class or nearest base class, if it is supported."""
    for cls in type(module).__mro__:
        h = HANDLERS.get(cls)
        if h is not None:
            return h if h.supported(module) else None
    return None


def per_sample_grads(a: Tensor, g: Tensor, has_bias: bool) -> list[Tensor]:
    """Per-sample weight (and bias) gradients from ``a`` `(n, G, T, I)`, ``g`` `(..., n, G, T, O)`.

    Returns tensors `(..., n, G·O, I)` and `(..., n, G·O)` (flattened like the parameters).
    """
    w = torch.einsum("...ngto,ngti->...ngoi", g, a)
    w = w.reshape(*w.shape[:-4], w.shape[-4], -1, w.shape[-1])
    out = [w]
    if has_bias:
        b = g.sum(-2)
        out.append(b.reshape(*b.shape[:-2], -1))
    return out


def summed_grads(a: Tensor, g: Tensor, has_bias: bool) -> list[Tensor]:
    """Gradients summed over samples, `(G·O, I)` and `(G·O,)`, from ``a`` and ``g``."""
    w = torch.einsum("ngto,ngti->goi", g, a)
    out = [w.reshape(-1, w.shape[-1])]
    if has_bias:
        out.append(g.sum((0, 2)).reshape(-1))
    return out


def diag_sq_sum(a: Tensor, g: Tensor, has_bias: bool) -> list[Tensor]:
    r""":math:`\sum_{k,n} (\nabla \ell_{n,k})^2` per weight/bias entry, `(G·O, I)` and `(G·O,)`.

    ``g`` is `(K, n, G, T, O)` for ``K`` backpropagated columns. Without weight sharing
    (``T == 1``) the square of an outer product is the outer product of squares, so the sum
    costs one matrix product instead of ``K·n`` outer products.
    """
    if a.shape[2] == 1:
        g2 = g.square().sum(0)[:, :, 0]  # (n, G, O)
        w = torch.einsum("ngo,ngi->goi", g2, a[:, :, 0].square())
        out = [w.reshape(-1, w.shape[-1])]
        if has_bias:
            out.append(g2.sum(0).reshape(-1))
        return out
    total = None
    for gk in g:  # one column at a time bounds the per-sample gradients to `(n, G·O, I)`
        sq = [t.square().sum(0) for t in per_sample_grads(a, gk, has_bias)]
        total = sq if total is None else [s + q for s, q in zip(total, sq)]
    return total
