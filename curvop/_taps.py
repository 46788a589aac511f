"""Layer taps: the inputs and output gradients of every handled layer, in one forward pass.

Used by the closed-form exact diagonal and by Kronecker factors. The forward runs functionally on
fresh leaf copies of the parameters; forward hooks (registered here and removed in ``finally``)
record each handled layer's input and hand the rest of the network a *clone* of its output, so
that in-place operations downstream (``ReLU(inplace=True)``) cannot rewrite the tapped tensor.

The taps are trusted only after a check: for one backpropagated column the gradient assembled
from the taps must equal autograd's gradient in the parameters. A parameter used outside its
layer's forward, a layer called twice, or anything else that breaks the ``(a, g)`` picture fails
the check and the caller falls back to the generic per-sample path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvop._functional import Batch
from curvop.layers import LayerHandler, handler_for, summed_grads

__all__ = ["Tap", "tap_layers"]


@dataclass
class Tap:
    """One handled layer: its parameters' positions in the live selection and its tensors."""

    module: nn.Module
    handler: LayerHandler
    param_slots: list[int]  # positions in the live parameter list: weight, then bias
    has_bias: bool
    a: Tensor | None = None
    out: Tensor | None = None
    g: Tensor | None = field(default=None, repr=False)  # (K, n, G, T, O)


def _plan(batch: Batch) -> list[Tap] | None:
    """One tap per handled layer owning live parameters, or None if a live one is unhandled."""
    slot = {n: i for i, n in enumerate(batch.sel.names)}
    taps, covered = [], set()
    for prefix, module in batch.fm.module.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        live = [f"{prefix}.{n}" if prefix else n for n in own]
        live = [n for n in live if n in slot]
        if not live:
            continue
        handler = handler_for(module)
        weight = f"{prefix}.weight" if prefix else "weight"
        bias = f"{prefix}.bias" if prefix else "bias"
        if handler is None or weight not in slot:
            return None
        has_bias = bias in slot
        taps.append(Tap(module, handler, [slot[weight]] + ([slot[bias]] if has_bias else []),
                        has_bias))
        covered.update(live)
    return taps if covered == set(slot) else None


def tap_layers(batch: Batch, S: Tensor, verified: set | None = None) -> list[Tap] | None:
    """Backpropagate the columns of ``S`` `(B, C, K)` and record ``(a, g)`` per handled layer.

    Args:
        batch: The batch.
        S: Columns to backpropagate.
        verified: Optional cache of structures (module, selection, input shape) whose taps
            already passed the check; skips the check's extra backward for them.

    Returns:
        The taps, or ``None`` when the model is not a composition of handled layers in which
        each live parameter enters only through its layer (checked numerically).
    """
    taps = _plan(batch)
    if taps is None:
        return None
    by_module = {id(t.module): t for t in taps}
    theta = [p.detach().requires_grad_() for p in batch.theta]
    calls: dict[int, int] = {}

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        tap = by_module[id(module)]
        calls[id(module)] = calls.get(id(module), 0) + 1
        tap.a = tap.handler.inputs(module, inputs[0].detach())
        tap.out = output
        return output.clone()

    handles = [t.module.register_forward_hook(hook) for t in taps]
    try:
        with torch.enable_grad():
            f = batch.fm(theta, batch.x)
    finally:
        for h in handles:
            h.remove()
    if any(calls.get(id(t.module), 0) != 1 for t in taps):
        return None
    outs = [t.out for t in taps]
    K = S.shape[-1]
    cols = S.permute(2, 0, 1)  # (K, B, C)
    key = (id(batch.fm.module), tuple(batch.sel.names), tuple(batch.x.shape[1:]),
           batch.x.dtype)
    check = verified is None or key not in verified
    with torch.enable_grad():
        if check:
            # a random cotangent, in the taps and the parameters, verifies the (a, g) picture
            gen = torch.Generator(f.device).manual_seed(0)
            probe = torch.randn(f.shape, generator=gen, device=f.device, dtype=f.dtype)
            checked = torch.autograd.grad(f, outs + theta, probe, retain_graph=True,
                                          allow_unused=True)
        try:
            gs = torch.autograd.grad(f, outs, cols, is_grads_batched=True, allow_unused=True)
        except RuntimeError:  # an op without a batching rule: one backward per column
            per_col = [torch.autograd.grad(f, outs, c, retain_graph=True, allow_unused=True)
                       for c in cols]
            gs = [None if any(pc[i] is None for pc in per_col)
                  else torch.stack([pc[i] for pc in per_col]) for i in range(len(outs))]
    for i, t in enumerate(taps):
        if gs[i] is None:
            return None
        if check:
            if checked[i] is None:
                return None
            g_probe = t.handler.outputs(t.module, checked[i].detach())
            if not _verify(t, g_probe, checked[len(taps):]):
                return None
        t.g = t.handler.outputs(t.module, gs[i].detach().flatten(0, 1)).unflatten(0, (K, -1))
    if verified is not None:
        verified.add(key)
    return taps


def _verify(t: Tap, g_probe: Tensor, param_grads: tuple) -> bool:
    """Does the gradient assembled from ``(a, g)`` equal autograd's, for the probe?"""
    summed = summed_grads(t.a, g_probe, t.has_bias)
    for s, slot in zip(summed, t.param_slots):
        ref = param_grads[slot]
        if ref is None:
            return False
        tol = 1e-9 if ref.dtype == torch.float64 else 1e-4
        if not torch.allclose(s.reshape(ref.shape), ref, rtol=tol,
                              atol=tol * float(ref.abs().max().clamp_min(1e-30))):
            return False
    return True
