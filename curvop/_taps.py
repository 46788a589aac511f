"""Layer taps: the inputs and output gradients of every handled layer, in one forward pass.

Used by the closed-form exact diagonal and by Kronecker factors. The forward runs functionally on
fresh leaf copies of the parameters; forward hooks (registered here and removed in ``finally``)
record each handled layer's input and hand the rest of the network a *clone* of its output, so
that in-place operations downstream (``ReLU(inplace=True)``) cannot rewrite the tapped tensor.

The taps are trusted only after a check: for one backpropagated column the gradient assembled
from the taps must equal autograd's gradient in the parameters. A parameter used outside its
layer's forward, a layer called twice, or anything else that breaks the ``(a, g)`` picture fails
the check and the caller falls back to the generic per-sample path.

With ``partial=True`` (Kronecker factors) the taps are per layer instead: the layers that pass
are returned with an :class:`Unhandled` entry, and its reason, for every module owning live
parameters that no tap covers.

``nn.MultiheadAttention`` applies its projections inside ``F.multi_head_attention_forward``,
where no module hook reaches; while attention layers are tapped, a ``TorchFunctionMode``
(thread-local, active only for the tapping forward) replaces that call inside each tapped
``nn.MultiheadAttention`` by :func:`curvop.layers.attention_forward`, which computes the same
function with the input projection (``in_proj_weight``, as three groups q/k/v) and
``out_proj`` made explicit and records their inputs and outputs. The numerical check covers
these taps like the others.

``nn.Embedding`` stores its weight transposed, `(I, O)` (see :mod:`curvop.layers`); its taps are
handed out only to callers that pass ``transposed=True`` and read :attr:`Tap.transposed` (the
gradient helpers of :mod:`curvop.layers` take it as an argument). For the others an embedding
is an :class:`Unhandled` module (``partial=True``) or makes the strict taps ``None``, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from curvop import _autograd
from curvop._functional import Batch, PendingBatch
from curvop.layers import (
    LayerHandler,
    attention_forward,
    handler_for,
    summed_grads,
    why_no_handler,
)

__all__ = ["Tap", "Unhandled", "tap_layers", "tap_layer_blocks", "plan_layers"]


@dataclass
class Tap:
    """One handled layer: its parameters' positions in the live selection and its tensors."""

    module: nn.Module
    handler: LayerHandler
    param_slots: list[int]  # positions in the live parameter list: weight, then bias
    has_bias: bool
    name: str = ""  # module path in the differentiated module ("" for the module itself)
    has_weight: bool = True  # False only in partial plans: a live bias with a frozen weight
    a: Tensor | None = None
    out: Tensor | None = None
    g: Tensor | None = field(default=None, repr=False)  # (K, n, G, T, O)
    #: true positions per group when groups were zero-padded to a common ``T`` (attention)
    lengths: tuple[int, ...] | None = None

    @property
    def transposed(self) -> bool:
        """The weight is stored `(I, O)` (``nn.Embedding``), the transpose of ``g aᵀ``."""
        return self.handler.transposed


#: structures (module, selection, input shape, tapped layers) whose forward changes a tapped
#: layer's output in place: their taps keep copies (see :func:`_tap`)
_CHANGED_IN_PLACE: set[tuple] = set()


@dataclass
class Unhandled:
    """A module owning live parameters that no tap covers, and why."""

    name: str  # module path in the differentiated module ("" for the module itself)
    module: nn.Module
    param_slots: list[int]  # positions in the live parameter list
    reason: str


def plan_layers(batch: Batch, transposed: bool = False) -> tuple[list[Tap], list[Unhandled]]:
    """Taps of the handled layers owning live parameters, and the modules left unhandled.

    A layer is handled when its type has a :func:`~curvop.layers.handler_for` and its live
    parameters are among its weight and bias (``weight``/``bias``; ``in_proj_weight``/
    ``in_proj_bias`` for attention; a live bias with a frozen weight gives a tap with
    ``has_weight=False``). Layers whose weight is stored transposed (``nn.Embedding``) are
    handled only with ``transposed=True``. Static only: the forward may still reject a tap (see
    :func:`tap_layers`).
    """
    slot = {n: i for i, n in enumerate(batch.sel.names)}
    taps, unhandled, covered = [], [], set()
    for prefix, module in batch.fm.module.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        live = [n for n in (f"{prefix}.{o}" if prefix else o for o in own) if n in slot]
        if not live:
            continue
        covered.update(live)
        handler = handler_for(module)
        if handler is not None and handler.transposed and not transposed:
            unhandled.append(Unhandled(prefix, module, [slot[n] for n in live],
                                       "its weight is stored transposed (I, O); this caller "
                                       "does not read Tap.transposed"))
            continue
        wname, bname = (handler.weight, handler.bias) if handler else ("weight", "bias")
        weight = f"{prefix}.{wname}" if prefix else wname
        bias = f"{prefix}.{bname}" if prefix else bname
        if handler is None or set(live) - {weight, bias}:
            reason = why_no_handler(module) if handler is None else \
                f"parameters other than weight and bias: {sorted(set(live) - {weight, bias})}"
            unhandled.append(Unhandled(prefix, module, [slot[n] for n in live], reason))
            continue
        has_weight, has_bias = weight in slot, bias in slot
        slots = ([slot[weight]] if has_weight else []) + ([slot[bias]] if has_bias else [])
        taps.append(Tap(module, handler, slots, has_bias, prefix, has_weight))
    stray = [n for n in slot if n not in covered]  # cannot happen with named_modules, but be safe
    if stray:
        unhandled.append(Unhandled("", batch.fm.module, [slot[n] for n in stray],
                                   "parameters not owned by any submodule"))
    return taps, unhandled


def _plan(batch: Batch, transposed: bool) -> list[Tap] | None:
    """One tap per handled layer owning live parameters, or None if a live one is unhandled."""
    taps, unhandled = plan_layers(batch, transposed)
    if unhandled or not all(t.has_weight for t in taps):
        return None
    return taps


def tap_layers(batch: Batch, S: Tensor, verified: set | None = None, *,
               partial: bool = False, transposed: bool = False
               ) -> list[Tap] | None | tuple[list[Tap], list[Unhandled]]:
    """Backpropagate the columns of ``S`` `(B, C, K)` and record ``(a, g)`` per handled layer.

    Args:
        batch: The batch.
        S: Columns to backpropagate.
        verified: Optional cache of structures (module, selection, input shape) whose taps
            already passed the check; skips the check's extra backward for them.
        partial: Return the taps that pass and the unhandled rest instead of all-or-nothing.
        transposed: The caller reads :attr:`Tap.transposed`: tap ``nn.Embedding`` too.

    Returns:
        The taps, or ``None`` when the model is not a composition of handled layers in which
        each live parameter enters only through its layer (checked numerically). With
        ``partial=True``: ``(taps, unhandled)``; a layer called other than once, whose output
        does not reach the model output or whose taps fail the check is moved to
        ``unhandled``, with the reason.
    """
    if partial:
        taps, unhandled = plan_layers(batch, transposed)
        if not taps:
            return taps, unhandled
        passed = _tap(batch, S, taps, verified, strict=False)[0]
        return [t for t in taps if id(t) not in passed], unhandled + [
            Unhandled(t.name, t.module, t.param_slots, passed[id(t)])
            for t in taps if id(t) in passed]
    taps = _plan(batch, transposed)
    if taps is None:
        return None
    return taps if not _tap(batch, S, taps, verified, strict=True)[0] else None


def tap_layer_blocks(batch: Batch | PendingBatch, S: Tensor | Callable[[Batch], Tensor],
                     verified: set | None, block: int, transposed: bool = False,
                     fold: bool = False) -> tuple[list[Tap], list[Unhandled], Iterator[None]]:
    """:func:`tap_layers` with ``partial=True``, the columns of ``S`` backpropagated in blocks.

    ``batch`` may be a :class:`~curvop._functional.PendingBatch` with ``S`` a function of the
    completed batch (see :func:`_tap`); it must then have a handled layer.

    One forward; the taps' ``g`` hold the first ``block`` columns `(block, n, G, T, O)`, and
    each step of the returned iterator replaces them by the next block (the forward's graph is
    kept until the iterator is exhausted). ``block == 1`` backpropagates column by column
    instead of through ``is_grads_batched``, whose vmap falls back to a loop and a stacking
    copy for operations without a batching rule (convolution and pooling backward).

    With ``fold`` (and ``block > 1``) the forward runs on ``block`` stacked copies of the
    inputs, and each block of columns is one ordinary backward pass whose cotangent holds
    column ``k`` in copy ``k``: the columns become samples, so every layer's backward is one
    kernel over ``block`` times the batch (a GPU is bound by kernel launches, and the batching
    rules of convolution and pooling backward loop over the columns). Samples are independent
    (the curvatures here are sums over samples), so the copies do not interact. Models with a
    tapped ``nn.MultiheadAttention`` are not folded.
    """
    taps, unhandled = plan_layers(batch, transposed)
    if not taps:
        return taps, unhandled, iter(())
    passed, more = _tap(batch, S, taps, verified, strict=False, block=block, fold=fold)
    return [t for t in taps if id(t) not in passed], unhandled + [
        Unhandled(t.name, t.module, t.param_slots, passed[id(t)])
        for t in taps if id(t) in passed], more


class _FoldedColumns:
    """Columns `(K, B, C)` for a forward on ``reps`` stacked copies of the batch.

    Indexing with a slice of at most ``reps`` columns gives the cotangent of the stacked
    outputs `(reps·B, C)`: column ``k`` of the slice in copy ``k``, zeros in the copies left.
    """

    def __init__(self, cols: Tensor, reps: int) -> None:
        self.cols, self.reps = cols, reps

    def __len__(self) -> int:
        return len(self.cols)

    def __getitem__(self, sl: slice) -> _FoldedColumns:
        return _FoldedColumns(self.cols[sl], self.reps)

    def stacked(self) -> Tensor:
        k, B = self.cols.shape[:2]
        out = self.cols.new_zeros(self.reps * B, *self.cols.shape[2:])
        out[: k * B] = self.cols.reshape(k * B, *self.cols.shape[2:])
        return out


def _backprop(f: Tensor, outs: list[Tensor], cols: Tensor | _FoldedColumns,
              retain: bool) -> list[Tensor | None]:
    """Gradients in ``outs`` of ``f`` for each cotangent in ``cols`` `(k, B, C)`, stacked.

    Folded columns (:class:`_FoldedColumns`) take one ordinary backward pass through the
    stacked copies; the gradients' copies are the columns.
    """
    if isinstance(cols, _FoldedColumns):
        k, B = cols.cols.shape[:2]
        gs = _autograd.grad([f], outs, [cols.stacked()], retain_graph=retain,
                            allow_unused=True)
        return [None if g is None else g[: k * B].unflatten(0, (k, B)) for g in gs]
    if len(cols) == 1:
        gs = _autograd.grad([f], outs, [cols[0]], retain_graph=retain, allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in gs]
    try:
        return list(torch.autograd.grad(f, outs, cols, is_grads_batched=True,
                                        retain_graph=retain, allow_unused=True))
    except RuntimeError:  # an op without a batching rule: one backward per column
        per_col = [torch.autograd.grad(f, outs, c, retain_graph=True, allow_unused=True)
                   for c in cols]
        return [None if any(pc[i] is None for pc in per_col)
                else torch.stack([pc[i] for pc in per_col]) for i in range(len(outs))]


def _tap(batch: Batch | PendingBatch, S: Tensor | Callable[[Batch], Tensor], taps: list[Tap],
         verified: set | None, strict: bool, block: int | None = None, fold: bool = False
         ) -> tuple[dict[int, str], Iterator[None]]:
    """Fill ``a`` and ``g`` of ``taps``; the rejected ones (by ``id``) with the reason.

    ``strict`` stops at the first rejection (the caller then discards every tap). With
    ``block``, ``g`` holds the first ``block`` columns and the returned iterator steps through
    the others (see :func:`tap_layer_blocks`); otherwise the iterator is empty. A
    :class:`~curvop._functional.PendingBatch` is completed from this forward pass and ``S``
    is then a function of the completed batch; both are left on it (``.batch``, ``.S``).
    """
    rejected: dict[int, str] = {}
    by_module = {id(t.module): t for t in taps}
    theta = [p.detach().requires_grad_() for p in batch.theta]
    calls: dict[int, int] = {}
    attention = _attention_modules(batch.fm.module, by_module)
    n = batch.x.shape[0]
    reps = block if fold and block is not None and block > 1 and not attention else 1
    x = batch.x if reps == 1 else batch.x.repeat(reps, *[1] * (batch.x.dim() - 1))

    # A layer's output is differentiated as it leaves the layer. The model goes on with that
    # very tensor (no copy per layer and call) unless the structure is known to change it in
    # place later (an in-place activation): then it goes on with a copy, and the tap keeps the
    # original. An in-place change bumps the tensor's version, so a forward that changed one
    # is redone with copies, and the structure remembered.
    structure = (id(batch.fm.module), tuple(batch.sel.names), tuple(batch.x.shape[1:]),
                 tuple(t.name for t in taps))
    versions: dict[int, int] = {}

    def record(module: nn.Module, a: Tensor, output: Tensor) -> Tensor:
        tap = by_module[id(module)]
        calls[id(module)] = calls.get(id(module), 0) + 1
        tap.a = tap.handler.inputs(module, a.detach()[:n] if reps > 1 else a.detach())
        tap.out = output
        if clone:
            return output.clone()
        versions[id(module)] = output._version
        return output

    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        return record(module, inputs[0], output)

    inside = {id(m.out_proj) for m in attention}  # tapped through attention_forward
    pending = isinstance(batch, PendingBatch)
    clone = structure in _CHANGED_IN_PLACE
    while True:
        handles = [t.module.register_forward_hook(hook) for t in taps
                   if t.handler.kind == "hook" and id(t.module) not in inside]
        try:
            with torch.enable_grad(), batch.guard() if pending else contextlib.nullcontext():
                if attention:
                    with _AttentionTaps(attention, by_module, record, handles):
                        f_raw = batch.fm.forward(theta, x)
                else:
                    f_raw = batch.fm.forward(theta, x)
        finally:
            for h in handles:
                h.remove()
        if clone or all(by_module[i].out._version == v for i, v in versions.items()):
            break
        _CHANGED_IN_PLACE.add(structure)
        clone = True
        calls.clear()
        versions.clear()
    f = f_raw.flatten(1) if f_raw.dim() > 2 else f_raw  # as FunctionalModel.__call__
    if pending:  # this forward gives the batch its outputs, and S comes from them
        S = S(batch.complete(f_raw[:n] if reps > 1 else f_raw))
        batch.S = S
    for t in taps:
        n_calls = calls.get(id(t.module), 0)
        if n_calls != 1:
            rejected[id(t)] = (f"called {n_calls} times in one forward (a shared or bypassed "
                               "layer has no single (a, g) pair)")
    if rejected and strict:
        return rejected, iter(())
    taps_ok = [t for t in taps if id(t) not in rejected]
    if not taps_ok:
        return rejected, iter(())
    outs = [t.out for t in taps_ok]
    K = S.shape[-1]
    cols = S.permute(2, 0, 1)  # (K, B, C)
    if reps > 1:  # columns as copies of the batch: zero cotangents for the unused copies
        cols = _FoldedColumns(cols, reps)
    # the tapped layers are part of the structure: callers that tap Embedding layers
    # (``transposed=True``) and callers that do not share a cache without skipping a check
    key = (*structure, batch.x.dtype)
    check = verified is None or key not in verified
    with torch.enable_grad():
        if check:
            # a random cotangent, in the taps and the parameters, verifies the (a, g) picture
            gen = torch.Generator(f.device).manual_seed(0)
            probe = torch.randn((n, *f.shape[1:]), generator=gen, device=f.device,
                                dtype=f.dtype)
            if reps > 1:  # in the first copy only
                probe = torch.cat([probe, probe.new_zeros(f.shape[0] - n, *f.shape[1:])])
            checked = torch.autograd.grad(f, outs + theta, probe, retain_graph=True,
                                          allow_unused=True)
            if reps > 1:
                checked = tuple(c if c is None or i >= len(outs) else c[:n]
                                for i, c in enumerate(checked))
        block = K if block is None else block
        gs = _backprop(f, outs, cols[:block], retain=block < K)
    for i, t in enumerate(taps_ok):
        if gs[i] is None or (check and checked[i] is None):
            rejected[id(t)] = "its output does not reach the model output"
        elif check and not _verify(t, t.handler.outputs(t.module, checked[i].detach()),
                                   checked[len(taps_ok):]):
            rejected[id(t)] = ("its parameters also enter the network outside its own forward "
                               "(tied or reused weights)")
        else:
            t.g = _outputs(t, gs[i])
            continue
        if strict:
            return rejected, iter(())
    if verified is not None and not rejected:
        verified.add(key)
    if block >= K:
        return rejected, iter(())
    live = [(i, t) for i, t in enumerate(taps_ok) if id(t) not in rejected]
    return rejected, _more_blocks(f, outs, cols, block, live)


def _outputs(t: Tap, g: Tensor) -> Tensor:
    """Stacked gradients `(k, B, ...)` in the layer output → ``g`` `(k, n, G, T, O)`."""
    return t.handler.outputs(t.module, g.detach().flatten(0, 1)).unflatten(0, (g.shape[0], -1))


def _more_blocks(f: Tensor, outs: list[Tensor], cols: Tensor, block: int,
                 live: list[tuple[int, Tap]]) -> Iterator[None]:
    """Set the live taps' ``g`` to each further block of columns in turn."""
    K = len(cols)
    for k0 in range(block, K, block):
        k1 = min(K, k0 + block)
        with torch.enable_grad():
            gs = _backprop(f, outs, cols[k0:k1], retain=k1 < K)
        for i, t in live:
            t.g = _outputs(t, gs[i])
        del gs
        yield


def _verify(t: Tap, g_probe: Tensor, param_grads: tuple) -> bool:
    """Does the gradient assembled from ``(a, g)`` equal autograd's, for the probe?"""
    summed = summed_grads(t.a, g_probe, t.has_bias, t.transposed)
    if not t.has_weight:
        summed = summed[1:]
    for s, slot in zip(summed, t.param_slots):
        ref = param_grads[slot]
        if ref is None:
            return False
        tol = 1e-9 if ref.dtype == torch.float64 else 1e-4
        if not torch.allclose(s.reshape(ref.shape), ref, rtol=tol,
                              atol=tol * float(ref.abs().max().clamp_min(1e-30))):
            return False
    return True


def _attention_modules(root: nn.Module, by_module: dict[int, Tap]) -> list[nn.MultiheadAttention]:
    """The ``nn.MultiheadAttention`` modules whose input projection or out_proj is tapped."""
    return [m for m in root.modules() if isinstance(m, nn.MultiheadAttention)
            and (id(m) in by_module or id(m.out_proj) in by_module)]


class _AttentionTaps(TorchFunctionMode):
    """Route ``F.multi_head_attention_forward`` of tapped attention modules to the taps.

    Forward pre-hooks (and forward hooks that run on errors too) keep a stack of the attention
    modules being evaluated; the first ``F.multi_head_attention_forward`` inside each is
    replaced by :func:`~curvop.layers.attention_forward`, recording into the taps of the module
    (input projection) and of its ``out_proj``. Every other call passes through untouched.
    """

    def __init__(self, modules: list[nn.MultiheadAttention], by_module: dict[int, Tap],
                 record, handles: list) -> None:
        super().__init__()
        self.stack: list[list] = []
        self.by_module = by_module
        self.record = record
        for m in modules:  # the caller removes the handles
            handles.append(m.register_forward_pre_hook(self._enter))
            handles.append(m.register_forward_hook(self._exit, always_call=True))

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self.stack.append([module, False])

    def _exit(self, module: nn.Module, args: tuple, output) -> None:
        self.stack.pop()

    def _record(self, module: nn.MultiheadAttention, which: str, a: Tensor, out: Tensor,
                lengths: tuple[int, ...]) -> Tensor:
        target = module if which == "in" else module.out_proj
        if id(target) not in self.by_module:
            return out
        if which == "in":
            self.by_module[id(target)].lengths = lengths
        return self.record(target, a, out)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward and self.stack and not self.stack[-1][1]:
            self.stack[-1][1] = True
            module = self.stack[-1][0]
            out = attention_forward(args, kwargs, lambda *r: self._record(module, *r))
            if out is not None:
                return out
        return func(*args, **kwargs)
