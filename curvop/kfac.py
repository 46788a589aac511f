r"""Kronecker factors (KFAC) of the square-root-form curvatures, from layer taps.

The exact GGN, the Monte-Carlo Fisher and the empirical Fisher are all
:math:`\sum_n J_n^\top S_n S_n^\top J_n` (see :mod:`curvop._sqrt_form`); backpropagating the
``K`` columns of ``S`` through a Linear/Conv layer gives its output gradients
``g`` `(K, n, G, T, O)` next to its unfolded inputs ``a`` `(n, G, T, I)` (:mod:`curvop._taps`;
``G`` convolution groups, ``T`` weight-sharing positions: tokens, pixels). The weight's block is
approximated by one Kronecker product per group (Eschenhagen et al., 2023, *Kronecker-Factored
Approximate Curvature for Modern Neural Network Architectures*):

``approx='expand'`` (positions are extra data points)

.. math::
    A = \sum_{k,n,t} g_{knt} g_{knt}^\top, \qquad B = \frac{1}{N T} \sum_{n,t} a_{nt} a_{nt}^\top

``approx='reduce'`` (positions are aggregated first)

.. math::
    A = \sum_{k,n} \Big(\sum_t g_{knt}\Big)\Big(\sum_t g_{knt}\Big)^\top, \qquad
    B = \frac1N \sum_n \bar a_n \bar a_n^\top, \quad \bar a_n = \frac1T \sum_t a_{nt}

Both are standard KFAC without weight sharing (``T == 1``). A bias gets its exact block,
:math:`C = \sum_{k,n} (\sum_t g_{knt})(\sum_t g_{knt})^\top` (the same in both modes; for
``T == 1`` it is :math:`\sum g g^\top`).

**Scaling (per batch).** Sums over ``k``, ``n`` and ``t`` run over the batch of size ``M``; the
input side is divided by the data-set size ``N``, not ``M``. For the whole data set in one batch
(``M == N``), ``A ⊗ B`` is the usual KFAC (exact for one datum, for a deep linear network with
one output, and for the last layer of a regression network), and summing the batches of a data
set factor-wise with :meth:`curvop.Kron.accumulate` gives the data-set KFAC
:math:`(\sum g g^\top) \otimes (\frac1N \sum a a^\top)`. This is laplace-torch 0.3's convention
(BackPACK KFLR/KFAC factors with the input side rescaled by ``M / N``); for an MLP the numbers
are BackPACK's. For convolutions BackPACK's factors are :math:`(\sum_{k,n} \hat g \hat g^\top)
\otimes (\frac1N \sum_{n,t} a a^\top)` with :math:`\hat g = \sum_t g`: the ``reduce`` output
side with ``T`` times the ``expand`` input side, neither of the two approximations here.
curvlinops' ``KFACLinearOperator`` (``separate_weight_and_bias=True``) has the same weight
blocks in both modes (for ``groups == 1``); its ``expand`` bias block treats positions as data,
:math:`\sum_{k,n,t} g g^\top`, where the bias here keeps its exact block; for grouped
convolutions it averages the inputs over groups into one ``A ⊗ B`` instead of one block per group.
ASDL's (``AsdlGGN.kron``) convolution weights are the ``expand`` blocks here, but its bias block
is the weight's output-side factor :math:`\sum_{k,n,t} g g^\top` (positions as data), not the
exact block. Neither backend's convolution factors can be converted into the ones here: they
would need sums (over positions of ``g g^\top``, or of ``a`` before the outer product) that
their results do not hold. For Linear layers without weight sharing all of them agree.

**Layout.** Blocks follow parameter order and each parameter's row-major layout: a weight
`(O, I)` (a convolution's `(O, C_in/G, *kernel)`) is ``[A, B]`` with ``A`` `(O, O)` and ``B``
`(I, I)`; a grouped convolution (``groups = G > 1``) has ``G`` consecutive blocks
``[A_g, B_g]`` of sizes `(O/G, O/G)` and `(I, I)`, one per group (rows of group ``g`` are
contiguous in the flattened weight; cross-group terms are dropped like cross-layer ones), so the
Kron then has more blocks than the model has parameter tensors; a bias is ``[C]``. The packed
``in_proj_weight`` `(3E, E)` of ``nn.MultiheadAttention`` is a layer with three groups (query,
key, value; see :mod:`curvop.layers`): ``[A_q, B_q], [A_k, B_k], [A_v, B_v]`` with each ``B``
from its own inputs and ``T`` its own token count (cross-attention), ``in_proj_bias`` one exact
``[C]`` `(3E, 3E)`, ``out_proj`` a Linear.

Every factor is a Gram matrix ``X Xᵀ`` (positive semi-definite) and exactly symmetric. On CPU
a large one is formed block row by block row of its upper triangle and mirrored (about half
the flops of one GEMM, like BLAS's symmetric rank-k update, which torch does not expose).

**Cost.** One forward with the layer taps, one backward of the ``K`` columns of ``S`` to the
layer outputs (no parameter gradients), and the Gram matrices: for a Linear layer with ``I``
inputs and ``O`` outputs on a batch of ``M``, about ``M K O²`` and ``M I²`` multiply-adds
(``T`` times more for ``expand`` with ``T`` positions). The taps' check against autograd runs
once per structure (cached in the interface), and the memory per sample that sizes the
chunks is remembered per structure too.

**Embedding.** ``nn.Embedding`` is a Linear layer without bias on one-hot inputs
(:mod:`curvop.layers`), factored the same way, with ``a`` the one-hot rows of the indices
(``padding_idx``: zero rows) and ``g`` the gradients in the embeddings. Its weight is stored
`(V, D)` = `(I, O)`, so its row-major block is ``[B, A]``: the input side first, `(V, V)`
(``expand``: the diagonal matrix of token counts divided by ``N T``, formed from the counts
without a Gram matrix; ``reduce``: :math:`\frac1N \sum_n \bar a_n \bar a_n^\top` of the
per-sequence token frequencies), then the output side `(D, D)`. ``Kron.accumulate`` sums
factor-wise as for the other layers.

**Other layers.** Parameters that no Linear/Conv/Embedding tap covers (LayerNorm, BatchNorm,
a module's own parameters, a layer called twice or whose weight is also used elsewhere) have no
Kronecker form: by default :class:`~curvop.errors.NotSupportedError` names every such module;
``fallback='diag'`` gives each of their tensors the exact diagonal of its curvature block as a
dense ``[torch.diag(h)]``, ``fallback='full'`` the exact dense block of each tensor (both through
per-sample products ``S_nᵀ J_n`` restricted to those parameters, with the same ``S``).

Example:
    One datum: the blocks are the exact GGN blocks of each parameter tensor.

    >>> import torch, curvop
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
    ...                           torch.nn.Linear(4, 2)).double()
    >>> x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
    >>> loss, K = curvop.TorchGGN(net, 'classification').kron(x, y, N=1)
    >>> K.layout, K.block_sizes
    ((2, 1, 2, 1), (12, 4, 8, 2))
    >>> G = curvop.TorchGGN(net, 'classification').full(x, y)[1]
    >>> bool(torch.allclose(K.to_dense()[:12, :12], G[:12, :12]))
    True
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvop._checks import check_fits, check_positive_int
from curvop._functional import Batch, FunctionalModel, PendingBatch, chunk_size
from curvop._gram import GRAM_COPY_ROWS, symmetrized
from curvop._gram import gram as _gram
from curvop._sqrt_form import sqrt_vjp_chunks
from curvop._taps import Tap, Unhandled, tap_layer_blocks, tap_layers
from curvop.errors import InputError, InputTypeError, NotSupportedError
from curvop.operators.kron import Kron
from curvop.params import ParameterSelection, trainable_named_parameters

__all__ = ["APPROXIMATIONS", "FALLBACKS", "kfac", "kron_hook", "check_kron_options"]

#: memory per sample of the taps, per module and structure (sizes the chunks; see :func:`kfac`)
_SAMPLE_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: weight-sharing approximations (Eschenhagen et al., 2023)
APPROXIMATIONS = ("expand", "reduce")
#: what parameters without a Kronecker form get
FALLBACKS = (None, "diag", "full")


def check_kron_options(approx: object, fallback: object, owner: str) -> tuple[str, str | None]:
    """Validate the ``kron`` options.

    Raises:
        InputTypeError: If ``approx`` or ``fallback`` is not a string (``fallback``: or None).
        InputError: If either is not one of the documented values.
    """
    if not isinstance(approx, str):
        raise InputTypeError(
            f"{owner}.kron: `approx` must be 'expand' or 'reduce'; got {type(approx).__name__}")
    if approx not in APPROXIMATIONS:
        raise InputError(f"{owner}.kron: `approx` must be 'expand' or 'reduce'; got {approx!r}")
    if fallback is not None and not isinstance(fallback, str):
        raise InputTypeError(f"{owner}.kron: `fallback` must be None, 'diag' or 'full'; got "
                             f"{type(fallback).__name__}")
    if fallback not in FALLBACKS:
        raise InputError(f"{owner}.kron: `fallback` must be None, 'diag' or 'full'; got "
                         f"{fallback!r}")
    return approx, fallback


@dataclass
class _Sums:
    """Per-layer sums over the batch: ``A`` `(G, O, O)`, ``B`` `(G, I, I)`, bias ``C``."""

    A: list[Tensor] | None = None
    B: list[Tensor] | None = None
    C: Tensor | None = None
    T: int | tuple[int, ...] = 1  # positions; per group where groups were padded (attention)
    scaled: bool = False  # B already divided by the data-set size (in its Gram matrix)


#: largest `(b, d, d)` stack of per-sample Gram matrices formed at once by :func:`_gram_sum`
_BMM_ENTRIES = 1 << 22


def _gram_sum(X: Tensor, out: Tensor | None = None) -> Tensor:
    """``Σ_b X_b X_bᵀ`` for ``X`` `(b, d, m)` (any strides), added to ``out`` if given.

    One Gram matrix of the `(d, b·m)` matrix when that is a view of ``X`` (or, copied, on a GPU
    or when ``d`` is large enough for the block rows of :func:`curvop._gram.gram` to pay for a
    copy); otherwise, on the CPU, batched products summed over ``b`` (no copy: convolutions'
    output gradients, positions contiguous).
    """
    b, d, m = X.shape
    if b == 1:
        return _gram(X[0], out)
    flat = X.permute(1, 0, 2)
    if m == 1 or flat.stride(1) == m * flat.stride(2):  # (d, b·m) is a view of X
        return _gram(flat.view(d, b * m), out)
    if X.device.type != "cpu" or d >= GRAM_COPY_ROWS:
        # a GPU is bound by launches: one copy and one GEMM, not a batched product and a sum
        # per step
        return _gram(flat.reshape(d, b * m), out)
    step = max(1, _BMM_ENTRIES // (d * d))
    total = None
    for Xc in X.split(step):
        term = (Xc @ Xc.mT).sum(0)
        total = term if total is None else total.add_(term)
    total = symmetrized(total)
    return total if out is None else out.add_(total)


def _accumulate(t: Tap, approx: str, s: _Sums, N: int, inputs: bool = True) -> None:
    """Add one chunk's sums of layer ``t`` to ``s``.

    The output side from ``t.g`` (the columns at hand), the input side from ``t.a`` only with
    ``inputs`` (once per chunk of samples, whatever the blocks of columns). The input side is
    divided by ``N`` here for a plain Linear layer (``s.scaled``), in :func:`_layer_blocks`
    otherwise.
    """
    a, g = t.a, t.g  # (n, G, T, I), (K, n, G, T, O)
    K, n, G, T, d_out = g.shape
    s.T = T if t.lengths is None else t.lengths  # true positions of zero-padded groups
    if approx == "reduce" or t.has_bias:  # (K, n, G, O): reduce output side, bias gradient
        g_sum = g[:, :, :, 0] if T == 1 else g.sum(3)
    if t.has_weight and T == 1 and G == 1 and not t.handler.onehot:
        # a plain Linear layer (or a convolution seen once): one Gram matrix per side, without
        # the per-group views below (this path runs for every layer of every call)
        g2 = g.reshape(K * n, d_out).mT
        s.A = [_gram(g2)] if s.A is None else [_gram(g2, s.A[0])]
        if inputs:
            a2 = a.reshape(n, -1).mT
            s.B = [_gram(a2, None if s.B is None else s.B[0], alpha=1.0 / N)]
            s.scaled = True
    elif t.has_weight:
        # per group `(b, features, data points)`, viewed where the strides allow
        if T == 1:
            gg = [g[:, :, i, 0].reshape(1, K * n, d_out).mT for i in range(G)]
            aa = [a[:, i, 0].mT.unsqueeze(0) for i in range(G)]
        elif approx == "expand":
            gg = [g[:, :, i].reshape(K * n, T, d_out).mT for i in range(G)]
            aa = [a[:, i].mT for i in range(G)]
        else:
            gg = [g_sum[:, :, i].reshape(1, K * n, d_out).mT for i in range(G)]
            if inputs:
                mean = (a.mean(2) if t.lengths is None
                        else a.sum(2) / a.new_tensor(t.lengths)[:, None])
                aa = [mean[:, i].mT.unsqueeze(0) for i in range(G)]
        s.A = ([_gram_sum(X) for X in gg] if s.A is None
               else [_gram_sum(X, F) for X, F in zip(gg, s.A)])
        if inputs and t.handler.onehot and (T == 1 or approx == "expand"):
            # one-hot rows: Σ a aᵀ is the diagonal of the token counts
            counts = [torch.diag(a[:, i].sum((0, 1))) for i in range(G)]
            s.B = counts if s.B is None else [F.add_(C) for F, C in zip(s.B, counts)]
        elif inputs:
            s.B = ([_gram_sum(X) for X in aa] if s.B is None
                   else [_gram_sum(X, F) for X, F in zip(aa, s.B)])
    if t.has_bias:
        if t.has_weight and G == 1 and (T == 1 or approx == "reduce"):
            s.C = None  # the bias block is the output-side factor: copied in _layer_blocks
        else:
            s.C = _gram(g_sum.reshape(K * n, G * d_out).mT, s.C)


def _column_block(module: nn.Module, K: int, device: torch.device) -> int:
    """Columns backpropagated at once: all (vmap), or one at a time for conv/pooling nets on CPU.

    Their batching rules copy operands, which costs more than the loop on one CPU thread; a GPU
    is bound by kernel launches, which the loop multiplies by ``K``.
    """
    if device.type != "cpu":
        return K
    looped = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd,
              nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._MaxUnpoolNd)
    return 1 if any(isinstance(m, looped) for m in module.modules()) else K


def _fold_columns(device: torch.device) -> bool:
    """Whether a block of columns is backpropagated as copies of the batch, not with vmap.

    Yes on GPUs, where one backward over ``block`` times the batch is a few large kernels
    instead of ``block`` small ones per layer (see :func:`curvop._taps.tap_layer_blocks`); no on
    CPU, where the copies' extra forward passes cost flops that the loop does not.
    """
    return device.type != "cpu"


def _tap_chunk(batch: Batch, S: Tensor, rows: slice, verified: set | None, block: int):
    """The taps of samples ``rows``, their output gradients in blocks of ``block`` columns."""
    return tap_layer_blocks(_sub_batch(batch, rows), S[rows], verified, block, transposed=True,
                            fold=_fold_columns(batch.sel.device))


def _add_chunk(taps: list[Tap], more, approx: str, sums: dict[str, _Sums], N: int) -> None:
    """Accumulate a chunk's taps over every block of columns, then free them."""
    for t in taps:
        _accumulate(t, approx, sums[t.name], N)
    for _ in more:
        for t in taps:
            _accumulate(t, approx, sums[t.name], N, inputs=False)
    for t in taps:
        t.a = t.g = t.out = None


def _layer_blocks(t: Tap, s: _Sums, N: int, approx: str) -> dict[int, list[list[Tensor]]]:
    """Blocks per live slot of layer ``t`` from its sums."""
    out: dict[int, list[list[Tensor]]] = {}
    slots = iter(t.param_slots)
    if t.has_weight:
        Ts = s.T if isinstance(s.T, tuple) else (s.T,) * len(s.A)
        blocks = [[A, B if s.scaled else B.div_(N * T if approx == "expand" else N)]
                  for A, B, T in zip(s.A, s.B, Ts)]
        # a weight stored (I, O) (Embedding): the input side is the first factor
        out[next(slots)] = [blk[::-1] for blk in blocks] if t.transposed else blocks
    if t.has_bias:
        out[next(slots)] = [[s.A[0].clone() if s.C is None else s.C]]
    return out


def _sub_batch(batch: Batch, rows: slice, fm: FunctionalModel | None = None) -> Batch:
    """The samples ``rows`` of ``batch`` (every other field kept), optionally another ``fm``."""
    if fm is None and rows.start in (0, None) and rows.stop >= batch.size:
        return batch
    return dataclasses.replace(batch, fm=fm or batch.fm, x=batch.x[rows],
                               y=None if batch.y is None else batch.y[rows], f=batch.f[rows])


def _module_label(u: Unhandled, batch: Batch) -> str:
    where = f"'{u.name}'" if u.name else "the model itself"
    names = [batch.sel.names[i].rsplit(".", 1)[-1] for i in u.param_slots]
    return f"{where} ({type(u.module).__name__}; {', '.join(names)}): {u.reason}"


def _raise_unhandled(unhandled: list[Unhandled], batch: Batch, owner: str) -> None:
    modules = "; ".join(_module_label(u, batch) for u in unhandled)
    raise NotSupportedError(
        f"{owner}.kron: no Kronecker form for {len(unhandled)} module(s) owning selected "
        f"parameters: {modules}. Pass fallback='diag' (their exact diagonal as dense blocks) or "
        f"fallback='full' (their exact dense blocks), or use {owner}.diag / {owner}.full")


def _factor_numel(taps: list[Tap], unhandled: list[Unhandled], batch: Batch,
                  fallback: str | None) -> int:
    """Entries of every factor the result will hold."""
    total = 0
    for t in taps:
        if t.has_weight:
            G, d_out, d_in = t.a.shape[1], t.g.shape[-1], t.a.shape[-1]
            total += G * (d_out * d_out + d_in * d_in)
        if t.has_bias:
            total += (t.g.shape[2] * t.g.shape[-1]) ** 2
    if fallback is not None:
        total += sum(batch.sel.numels[i] ** 2 for u in unhandled for i in u.param_slots)
    return total


def _exact_blocks(batch: Batch, S: Tensor, slots: list[int], fallback: str
                  ) -> dict[int, list[list[Tensor]]]:
    """Exact diagonal (as ``torch.diag``) or dense block of each live tensor in ``slots``.

    Per-sample products ``S_nᵀ J_n`` with only those tensors differentiated.
    """
    sel = batch.sel
    slots = sorted(slots)
    names = [sel.names[i] for i in slots]
    offset, start = {}, 0
    for n, p in trainable_named_parameters(sel.module):
        offset[n] = start
        start += p.numel()
    idx = torch.cat([torch.arange(offset[n], offset[n] + sel.numels[i])
                     for n, i in zip(names, slots)])
    sub_sel = ParameterSelection(sel.module, idx)
    sub = _sub_batch(batch, slice(None), FunctionalModel(sel.module, sub_sel))
    numels = [sel.numels[i] for i in slots]
    acc = [batch.f.new_zeros(p) if fallback == "diag" else batch.f.new_zeros(p, p)
           for p in numels]
    for M in sqrt_vjp_chunks(sub, S):
        for total, Mi in zip(acc, M.split(numels, dim=-1)):
            if fallback == "diag":
                total += Mi.square().sum((0, 1))
            else:
                Mi = Mi.reshape(-1, Mi.shape[-1])
                total.addmm_(Mi.T, Mi)
    return {i: [[torch.diag(h) if fallback == "diag" else (h + h.mT) / 2]]
            for i, h in zip(slots, acc)}


def kfac(batch: Batch | PendingBatch, S: Tensor | Callable[[Batch], Tensor], N: int, *,
         approx: str = "expand", fallback: str | None = None, verified: set | None = None,
         owner: str = "kfac", max_bytes: int | None = None, s_key: object = None) -> Kron:
    r"""KFAC of :math:`\sum_n J_n^\top S_n S_n^\top J_n` for one batch (see the module docstring).

    Args:
        batch: The batch (whole parameter tensors selected: ``batch.sel.index is None``), or a
            :class:`~curvop._functional.PendingBatch`: when the whole batch fits in one chunk
            its outputs then come from the tapped forward pass (one forward instead of two).
        S: Square-root columns `(B, C, K)` (exact, sampled, or the output gradients), or a
            function giving them for the (completed) batch.
        s_key: With ``S`` a function: a hashable name of what it computes (the number of
            columns must follow from it and the structure); ``S.shape[-1]`` otherwise.
        N: Size of the whole data set (the input-side factors are divided by it).
        approx: ``'expand'`` or ``'reduce'`` for weight sharing.
        fallback: ``None``, ``'diag'`` or ``'full'`` for parameters without a Kronecker form.
        verified: The caller's cache of structures whose taps passed their check.
        owner: Class name for messages.
        max_bytes: Limit for the factors, as in :func:`~curvop._checks.check_fits`.

    Returns:
        A :class:`~curvop.Kron` with blocks in parameter order.

    Raises:
        NotSupportedError: If a subnetwork splits parameter tensors, or (without ``fallback``)
            some selected parameters have no Kronecker form; the message names every module.
        InputError, InputTypeError: If ``N``, ``approx`` or ``fallback`` is invalid.
        MemoryBudgetError: If the factors cannot fit (before they are formed).
    """
    approx, fallback = check_kron_options(approx, fallback, owner)
    N = check_positive_int(N, "N")
    if batch.sel.index is not None:
        raise NotSupportedError(
            f"{owner}.kron: a subnetwork that splits parameter tensors (or reorders them) has no "
            "Kronecker form; `subnetwork_indices` must select whole tensors in parameter order, "
            f"or use {owner}.full / {owner}.diag on the subnetwork")
    # The first chunk settles which layers pass their check. Its size comes from the memory
    # per sample of this structure's taps, remembered from an earlier call; a structure seen
    # for the first time is measured (and its taps checked) on one sample first, which is then
    # discarded, so that the chunks, and hence the rounding, are the same in every call.
    key = (tuple(batch.sel.names), tuple(batch.x.shape[1:]), batch.x.dtype, batch.sel.dtype,
           batch.sel.device, s_key if callable(S) else S.shape[-1])
    sizes = _SAMPLE_BYTES.setdefault(batch.fm.module, {})
    B = batch.size
    sqrt = S if callable(S) else (lambda _: S)
    pending = batch if isinstance(batch, PendingBatch) else None
    if pending is not None and (key not in sizes
                                or chunk_size(batch.budget, sizes[key][0], B) < B):
        pending, batch = None, batch.forward_without_graph()  # f first, then chunks
    if pending is None:
        S = sqrt(batch)
        if key not in sizes:
            one = slice(0, 1)
            taps, _ = tap_layers(_sub_batch(batch, one), S[one], verified, partial=True,
                                 transposed=True)
            block = _column_block(batch.fm.module, S.shape[-1], batch.sel.device)
            # folded columns also hold ``block`` copies of the forward's activations, about
            # as large as the block's output gradients at the taps
            g_copies = 2 if block > 1 and _fold_columns(batch.sel.device) else 1
            sizes[key] = (4 * batch.itemsize * sum(
                t.a.numel() + g_copies * t.g.numel() * block // S.shape[-1] for t in taps),
                block)
            del taps
    per_sample, block = sizes[key]
    if pending is None:
        first = slice(0, chunk_size(batch.budget, per_sample, B))
        taps, unhandled, more = _tap_chunk(batch, S, first, verified, block)
    else:  # one chunk: the tapped forward completes the batch, and S comes from its outputs
        first = slice(0, B)
        taps, unhandled, more = tap_layer_blocks(pending, sqrt, verified, block,
                                                 transposed=True,
                                                 fold=_fold_columns(pending.sel.device))
        batch, S = pending.settled(sqrt)
    if unhandled and fallback is None:
        _raise_unhandled(unhandled, batch, owner)
    check_fits((_factor_numel(taps, unhandled, batch, fallback),), batch.sel.dtype,
               batch.sel.device, "the Kronecker factors", max_bytes)
    names = [t.name for t in taps]
    sums = {t.name: _Sums() for t in taps}
    _add_chunk(taps, more, approx, sums, N)
    start = first.stop
    while start < B:
        rows = slice(start, start + chunk_size(batch.budget, per_sample, B - start))
        chunk_taps, _, more = _tap_chunk(batch, S, rows, verified, block)
        if [t.name for t in chunk_taps] != names:
            raise NotSupportedError(
                f"{owner}.kron: the layers that can be tapped differ between samples "
                f"({names} for the first samples, {[t.name for t in chunk_taps]} later)")
        _add_chunk(chunk_taps, more, approx, sums, N)
        start = rows.stop
    blocks: dict[int, list[list[Tensor]]] = {}
    for t in taps:
        blocks.update(_layer_blocks(t, sums[t.name], N, approx))
    if unhandled:
        blocks.update(_exact_blocks(batch, S, [i for u in unhandled for i in u.param_slots],
                                    fallback))
    ordered = [block for i in range(len(batch.sel.names)) for block in blocks[i]]
    # built here, symmetric and finite by construction: the internal form skips the checks
    # that `Kron(kfacs)` runs on factors handed in by users
    return Kron(*(F for block in ordered for F in block), layout=[len(b) for b in ordered])


def kron_hook(interface, batch: Batch, N: int, sqrt: Callable[[Batch], Tensor],
              approx: str = "expand", fallback: str | None = None, **kwargs) -> Kron:
    """The ``_kron`` hook of a native interface whose ``S`` is ``sqrt(batch)``.

    Raises:
        InputTypeError: On unexpected keyword arguments (and see :func:`kfac`).
    """
    owner = type(interface).__name__
    if kwargs:
        raise InputTypeError(
            f"{owner}.kron got unexpected keyword arguments {sorted(kwargs)}; it takes "
            "`approx` ('expand' or 'reduce') and `fallback` (None, 'diag' or 'full')")
    check_kron_options(approx, fallback, owner)  # before an MC draw consumes the generator
    # S as a function: with a PendingBatch it is computed from the tapped forward's outputs;
    # what it computes is named by the interface's sampling settings
    s_key = (owner, interface.likelihood, getattr(interface, "stochastic", False),
             getattr(interface, "num_samples", 0))
    return kfac(batch, sqrt, N, approx=approx, fallback=fallback,
                verified=interface._verified_taps, owner=owner,
                max_bytes=interface.max_bytes, s_key=s_key)
