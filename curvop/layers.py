r"""Layers with a closed form (Linear, Conv, attention, Embedding) as ``(inputs, output grads)``.

Linear and convolution layers, the packed input projection of ``nn.MultiheadAttention``, and
``nn.Embedding``.

For such a layer the gradient of sample ``n`` in the weight is a sum over weight-sharing positions
``t`` (tokens, pixels) of outer products,

.. math::

    \nabla_W \ell_n = \sum_t g_{n,t} a_{n,t}^\top, \qquad \nabla_b \ell_n = \sum_t g_{n,t},

with ``a`` the (unfolded) layer input `(n, T, I)` and ``g`` the gradient in the layer output
`(n, T, O)`. Every structure that exploits layers — the exact diagonal's closed form, Kronecker
factors — works on these two tensors. Handlers are looked up along ``type(module).__mro__``, so
subclasses of ``nn.Linear`` / ``nn.ConvNd`` are handled too.

**Attention.** ``nn.MultiheadAttention`` computes ``q, k, v = x_q W_qᵀ + b_q, x_k W_kᵀ + b_k,
x_v W_vᵀ + b_v`` with the three weights stacked row-wise in ``in_proj_weight`` `(3E, E)` — three
linear maps in one tensor, seen here as a layer with ``G = 3`` groups (like a grouped
convolution): ``a`` `(n, 3, T, E)` stacks the query, key and value inputs, ``g`` the gradients in
``q``, ``k``, ``v``. In cross-attention the query has ``T_q`` tokens and key/value ``T_k``; the
shorter ones are zero-padded to ``T = max`` (zeros add nothing to any sum) and ``lengths``
`(T_q, T_k, T_k)` keeps the true counts. Its ``out_proj`` is an ``nn.Linear`` that
``F.multi_head_attention_forward`` applies with ``F.linear`` on ``out_proj.weight`` — no forward
hook sees it —, so both are tapped by :func:`attention_forward`, which the layer taps substitute
for ``F.multi_head_attention_forward`` (see :mod:`curvop._taps`).

**Embedding.** ``nn.Embedding`` is a Linear layer without bias on one-hot inputs: the output at
token ``t`` is ``W[i_t] = Wᵀ e_{i_t}``, so ``a`` `(n, 1, T, V)` holds the one-hot rows of the
indices (``V = num_embeddings``) and ``g`` `(n, 1, T, D)` the gradients in the embeddings. Its
weight is stored *transposed* relative to ``nn.Linear``: `(V, D)`, i.e. `(I, O)`, with gradient
:math:`\sum_t a_{n,t} g_{n,t}^\top`; the handler says so (``transposed=True``) and the gradient
helpers below return that layout when asked. ``padding_idx`` gets a zero one-hot column (torch
never updates that row, so its gradient, and every curvature entry of it, is zero).
``max_norm`` (renormalises the weight in place during the forward), ``scale_grad_by_freq``
(rescales the gradient by batch counts) and ``sparse`` have no handler.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LayerHandler", "handler_for", "why_no_handler", "HANDLERS", "per_sample_grads",
           "summed_grads", "diag_sq_sum", "unfold", "attention_forward"]


@dataclass(frozen=True)
class LayerHandler:
    """How to see a layer as ``(a, g)`` pairs.

    Attributes:
        inputs: Maps ``(module, input)`` to ``a`` `(n, G, T, I)` (``G`` groups, 1 but for grouped
            convolutions; ``I`` includes the kernel positions).
        outputs: Maps ``(module, output-like)`` to `(n, G, T, O/G)`.
        supported: Whether this instance has the closed form.
        why_not: The reason, for an instance that is not supported.
        weight, bias: Names of the layer's weight and bias parameters.
        kind: ``'hook'`` (tapped by a forward hook on the module) or ``'attention'`` (tapped
            through :func:`attention_forward`).
        transposed: The weight is stored `(I, O)` (``nn.Embedding``): its gradient is the
            transpose of the generic `(O, I)` one (only with ``G == 1``).
        onehot: ``a`` holds one-hot rows (or zero rows), so ``Σ a aᵀ`` over positions is the
            diagonal matrix of the column sums.
    """

    inputs: Callable[[nn.Module, Tensor], Tensor]
    outputs: Callable[[nn.Module, Tensor], Tensor]
    supported: Callable[[nn.Module], bool] = lambda m: True
    why_not: Callable[[nn.Module], str] = lambda m: "no closed (a, g) form for this layer"
    weight: str = "weight"
    bias: str = "bias"
    kind: str = "hook"
    transposed: bool = False
    onehot: bool = False


def _linear_inputs(module: nn.Linear, a: Tensor) -> Tensor:
    return a.reshape(a.shape[0], 1, -1, a.shape[-1])


def _linear_outputs(module: nn.Linear, g: Tensor) -> Tensor:
    return g.reshape(g.shape[0], 1, -1, g.shape[-1])


def _conv_dims(module: nn.Module) -> int:
    return len(module.kernel_size)


def unfold(module: nn.Module, x: Tensor) -> Tensor:
    """Unfold the input of a convolution: `(n, C_in, *spatial)` → `(n, C_in·k, T)`.

    The patches as one strided view of the zero-padded input (kernel offsets step by the
    dilation, output positions by the stride) and one copy into ``F.unfold``'s layout, in any
    dimension. Written by hand because ``F.unfold`` covers 2-D only and its im2col launches one
    kernel per sample on CUDA (and is 2-3x slower on CPU), while the one-hot convolution of
    unfoldNd rounds float32 inputs to TF32 under cuDNN's default settings; this copy is exact.
    """
    kernel, stride = tuple(module.kernel_size), tuple(module.stride)
    dilation, padding = tuple(module.dilation), tuple(module.padding)
    if any(padding):
        x = F.pad(x, [q for p in reversed(padding) for q in (p, p)])
    n, C, *spatial = x.shape
    out = [(m - dl * (k - 1) - 1) // s + 1
           for m, k, dl, s in zip(spatial, kernel, dilation, stride)]
    steps = x.stride()[2:]
    view = x.as_strided(
        (n, C, *kernel, *out),
        (*x.stride()[:2], *[dl * st for dl, st in zip(dilation, steps)],
         *[s * st for s, st in zip(stride, steps)]),
    )
    return view.reshape(n, C * math.prod(kernel), math.prod(out))


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


def _conv_why_not(module: nn.Module) -> str:
    return (f"padding_mode={module.padding_mode!r}, padding={module.padding!r} "
            "(only zero padding given as integers has a closed form)")


def _identity(module: nn.Module, t: Tensor) -> Tensor:
    return t


def _mha_supported(module: nn.MultiheadAttention) -> bool:
    return bool(module._qkv_same_embed_dim) and module.in_proj_weight is not None


def _mha_why_not(module: nn.MultiheadAttention) -> str:
    return (f"separate query/key/value projection weights (kdim={module.kdim}, "
            f"vdim={module.vdim} differ from embed_dim={module.embed_dim}); only the packed "
            "in_proj_weight has a Kronecker form here")


def _embedding_inputs(module: nn.Embedding, idx: Tensor) -> Tensor:
    """Indices `(n, ...)` → one-hot rows `(n, 1, T, V)`, zero rows at ``padding_idx``."""
    onehot = F.one_hot(idx.reshape(idx.shape[0], -1), module.num_embeddings)
    onehot = onehot.to(module.weight.dtype)
    if module.padding_idx is not None:
        onehot[..., module.padding_idx] = 0
    return onehot.unsqueeze(1)


def _embedding_supported(module: nn.Embedding) -> bool:
    return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse


def _embedding_why_not(module: nn.Embedding) -> str:
    if module.max_norm is not None:
        return (f"max_norm={module.max_norm} renormalises the embedding rows in place during the "
                "forward, so the weight seen by the loss is not the parameter")
    if module.scale_grad_by_freq:
        return ("scale_grad_by_freq=True rescales the gradient by token counts in the batch, "
                "which is not the gradient of the loss")
    return "sparse=True (sparse gradients) has no closed (a, g) form here"


_CONV = {"supported": _conv_supported, "why_not": _conv_why_not}

HANDLERS: dict[type, LayerHandler] = {
    nn.Linear: LayerHandler(_linear_inputs, _linear_outputs),
    nn.Conv1d: LayerHandler(_conv_inputs, _conv_outputs, **_CONV),
    nn.Conv2d: LayerHandler(_conv_inputs, _conv_outputs, **_CONV),
    nn.Conv3d: LayerHandler(_conv_inputs, _conv_outputs, **_CONV),
    # ``a`` and ``g`` arrive in `(n, 3, T, E)` form from attention_forward
    nn.MultiheadAttention: LayerHandler(_identity, _identity, _mha_supported, _mha_why_not,
                                        weight="in_proj_weight", bias="in_proj_bias",
                                        kind="attention"),
    nn.Embedding: LayerHandler(_embedding_inputs, _linear_outputs, _embedding_supported,
                               _embedding_why_not, transposed=True, onehot=True),
}


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of ``module``'s class or nearest base class, if it is supported."""
    for cls in type(module).__mro__:
        h = HANDLERS.get(cls)
        if h is not None:
            return h if h.supported(module) else None
    return None


def why_no_handler(module: nn.Module) -> str:
    """Why :func:`handler_for` gives no handler for ``module``."""
    for cls in type(module).__mro__:
        h = HANDLERS.get(cls)
        if h is not None:
            return h.why_not(module)
    return "no closed (a, g) form for this layer type"


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _pad_tokens(ts: list[Tensor]) -> Tensor:
    """`(T_i, n, d)` tensors → `(n, len(ts), max T_i, d)`, zero-padded along the tokens."""
    T = max(t.shape[0] for t in ts)
    return torch.stack([F.pad(t, (0, 0, 0, 0, 0, T - t.shape[0])) for t in ts]).permute(2, 0, 1, 3)


def attention_forward(args: tuple, kwargs: dict,
                      record: Callable[[str, Tensor, Tensor, tuple[int, ...]], Tensor]):
    """``F.multi_head_attention_forward(*args, **kwargs)`` with its projections made explicit.

    The input projection runs here as three ``F.linear`` (on the rows of ``in_proj_weight``),
    the attention itself in ``F.multi_head_attention_forward`` with identity projections (so
    masks, ``bias_k``/``bias_v``, ``add_zero_attn``, causal hints and attention weights keep
    torch's own handling), and the output projection as an ``F.linear`` again. ``record`` is
    called with ``('in', a, out, lengths)`` (``a``, ``out`` `(n, 3, T, E)`, ``lengths`` the
    true token counts of query, key and value) and ``('out', a, out, ())`` (`(n, T_q, E)`
    each) and returns the tensor that continues the forward (a clone of ``out``, so that
    in-place operations downstream cannot rewrite the recorded one).

    Returns:
        The function's result, or ``None`` when the call is not of the packed, batched form
        (the caller then runs the original; the taps stay empty and are rejected).
    """
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    query, key, value = a["query"], a["key"], a["value"]
    W = a["in_proj_weight"]
    if (query.dim() != 3 or a["use_separate_proj_weight"] or W is None
            or a["static_k"] is not None or a["static_v"] is not None):
        return None
    E = a["embed_dim_to_check"]
    b = a["in_proj_bias"]
    biases = b.chunk(3) if b is not None else (None, None, None)
    inputs = [query, key, value]
    proj = [F.linear(x, w, bb) for x, w, bb in zip(inputs, W.chunk(3), biases)]
    lengths = tuple(t.shape[0] for t in inputs)
    qkv = record("in", _pad_tokens(inputs).detach(), _pad_tokens(proj), lengths)
    q, k, v = (qkv[:, i, :T].transpose(0, 1) for i, T in enumerate(lengths))
    eye = torch.eye(E, dtype=query.dtype, device=query.device)
    attn, weights = F.multi_head_attention_forward(
        q, k, v, E, a["num_heads"], None, None, a["bias_k"], a["bias_v"], a["add_zero_attn"],
        a["dropout_p"], eye, None, training=a["training"],
        key_padding_mask=a["key_padding_mask"], need_weights=a["need_weights"],
        attn_mask=a["attn_mask"], use_separate_proj_weight=True, q_proj_weight=eye,
        k_proj_weight=eye, v_proj_weight=eye, average_attn_weights=a["average_attn_weights"],
        is_causal=a["is_causal"])
    a_out = attn.transpose(0, 1)
    out = F.linear(a_out, a["out_proj_weight"], a["out_proj_bias"])
    out = record("out", a_out.detach(), out, ())
    return out.transpose(0, 1), weights


def per_sample_grads(a: Tensor, g: Tensor, has_bias: bool,
                     transposed: bool = False) -> list[Tensor]:
    """Per-sample weight (and bias) gradients from ``a`` `(n, G, T, I)`, ``g`` `(..., n, G, T, O)`.

    Returns tensors `(..., n, G·O, I)` and `(..., n, G·O)` (flattened like the parameters);
    with ``transposed`` (``G == 1``) the weight's `(..., n, I, O)`.
    """
    w = torch.einsum("...ngto,ngti->...ngoi", g, a)
    w = w.reshape(*w.shape[:-4], w.shape[-4], -1, w.shape[-1])
    out = [w.mT if transposed else w]
    if has_bias:
        b = g.sum(-2)
        out.append(b.reshape(*b.shape[:-2], -1))
    return out


def summed_grads(a: Tensor, g: Tensor, has_bias: bool, transposed: bool = False) -> list[Tensor]:
    """Gradients summed over samples, `(G·O, I)` and `(G·O,)`, from ``a`` and ``g``.

    With ``transposed`` (``G == 1``) the weight's is `(I, O)`.
    """
    w = torch.einsum("ngto,ngti->goi", g, a)
    w = w.reshape(-1, w.shape[-1])
    out = [w.mT if transposed else w]
    if has_bias:
        out.append(g.sum((0, 2)).reshape(-1))
    return out


def diag_sq_sum(a: Tensor, g: Tensor, has_bias: bool, transposed: bool = False) -> list[Tensor]:
    r""":math:`\sum_{k,n} (\nabla \ell_{n,k})^2` per weight/bias entry, `(G·O, I)` and `(G·O,)`.

    ``g`` is `(K, n, G, T, O)` for ``K`` backpropagated columns. Without weight sharing
    (``T == 1``) the square of an outer product is the outer product of squares, so the sum
    costs one matrix product instead of ``K·n`` outer products. With ``transposed``
    (``G == 1``) the weight's is `(I, O)`.
    """
    if transposed:
        out = diag_sq_sum(a, g, has_bias)
        return [out[0].mT, *out[1:]]
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
