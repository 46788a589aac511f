r"""Kernels with the derivatives curvop needs, swapped in for every model evaluation.

Curvatures need more derivatives than training does: forward mode (``J v``), double backward
(``Jᵀ u`` differentiated in ``u``, Hessian-vector products) and ``vmap`` over samples. Several of
torch's fused kernels have only a first backward:

- the fused attention kernels of ``F.scaled_dot_product_attention`` (flash attention on CPU and
  CUDA, memory-efficient and cuDNN attention on CUDA): no forward-mode AD, no double backward;
- the fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` /
  ``nn.TransformerEncoder`` in eval mode (``aten::_transformer_encoder_layer_fwd``,
  ``aten::_native_multi_head_attention``, nested tensors for padding masks): no AD at all;
- cuDNN's RNN kernels (``nn.LSTM``/``nn.GRU``/``nn.RNN`` on CUDA): no double backward, and no
  backward at all in eval mode.

:func:`differentiable_kernels` selects the composite implementations instead — the math backend
of scaled-dot-product attention (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``), the MHA
fast path off (``torch.backends.mha.set_fastpath_enabled(False)``) and, for modules that contain
an RNN, cuDNN off (``torch.backends.cudnn.enabled = False``) — and restores the user's settings
on exit, also when the body raises. The composite implementations compute the same function
(up to rounding) from ordinary ops whose derivatives of every order exist.

It is applied in one place, :meth:`curvop._functional.FunctionalModel.__call__`, which every model
evaluation of the native backend goes through (outputs, Jacobians, gradients, products, layer
taps, forward-mode fallbacks). The choice of kernel is made in the forward pass and recorded in
the autograd graph: backward passes through a graph built inside the context (the cached
linearisations of the matrix-free operators, differentiated long after the call that built
them) need no context of their own.

These settings are process-wide in torch; another thread running attention while curvop
evaluates the model sees the math kernels too. A model whose own ``forward`` selects kernels
(``with sdpa_kernel(...)`` inside ``forward``) overrides this choice.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["differentiable_kernels", "kernel_settings", "has_rnn"]

def _sdp_switches() -> list[tuple]:
    """``(get, set, name)`` of every attention backend switch this torch has.

    The flags ``torch.nn.attention.sdpa_kernel`` reads and writes, called directly: its Python
    wrapper (a generator context manager rebuilding the backend list) costs 25 us per model
    evaluation on one CPU thread, as much as a small layer's forward.
    """
    out = []
    for name in ("cudnn", "flash", "mem_efficient", "math", "overrideable"):
        get = getattr(torch._C, f"_get_{name}_sdp_enabled", None)
        put = getattr(torch._C, f"_set_sdp_use_{name}", None)
        if get is not None and put is not None:
            out.append((get, put, name))
    return out


_SDP = _sdp_switches()
if not any(name == "math" for *_, name in _SDP):  # pragma: no cover - other torch builds
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _SDP = []

    def _math_attention():
        return sdpa_kernel(SDPBackend.MATH)
else:
    _math_attention = None


def has_rnn(module: nn.Module) -> bool:
    """Does ``module`` contain an ``nn.RNNBase`` (LSTM, GRU, RNN)?"""
    return any(isinstance(m, nn.RNNBase) for m in module.modules())


def kernel_settings() -> dict[str, bool]:
    """The global settings :func:`differentiable_kernels` changes, by name (for tests)."""
    out = {"mha_fastpath": _get_fastpath(), "cudnn": bool(torch.backends.cudnn.enabled)}
    for name in ("flash", "mem_efficient", "math", "cudnn"):
        getter = getattr(torch.backends.cuda, f"{name}_sdp_enabled", None)
        if getter is not None:
            out[f"sdp_{name}"] = bool(getter())
    return out


def _get_fastpath() -> bool:
    mha = getattr(torch.backends, "mha", None)
    return True if mha is None else bool(mha.get_fastpath_enabled())


def _set_fastpath(value: bool) -> None:
    mha = getattr(torch.backends, "mha", None)
    if mha is not None:
        mha.set_fastpath_enabled(value)


class differentiable_kernels:  # noqa: N801 - used like the context-manager function it was
    """Evaluate with kernels that have every derivative curvop takes; restore settings on exit.

    A class rather than a generator function: it is entered on every model evaluation.

    Args:
        rnn: Switch cuDNN off too (for modules containing an RNN, see :func:`has_rnn`); other
            modules keep cuDNN, whose convolutions have every derivative.

    Example:
        >>> import torch
        >>> before = kernel_settings()
        >>> with differentiable_kernels():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
        >>> kernel_settings() == before
        True
    """

    __slots__ = ("rnn", "saved", "fallback")

    def __init__(self, rnn: bool = False) -> None:
        self.rnn = rnn

    def __enter__(self) -> None:
        # read everything before changing anything: an exception here leaves all as it was
        self.saved = (_get_fastpath(), torch.backends.cudnn.enabled,
                      [get() for get, _, _ in _SDP])
        self.fallback = None if _math_attention is None else _math_attention()
        if self.fallback is not None:
            self.fallback.__enter__()
        for _, put, name in _SDP:
            put(name == "math")
        _set_fastpath(False)
        if self.rnn:
            torch.backends.cudnn.enabled = False

    def __exit__(self, *exc) -> None:
        fastpath, cudnn, sdp = self.saved
        _set_fastpath(fastpath)
        if self.rnn:
            torch.backends.cudnn.enabled = cudnn
        for (_, put, _), value in zip(_SDP, sdp):
            put(value)
        if self.fallback is not None:
            self.fallback.__exit__(*exc)
