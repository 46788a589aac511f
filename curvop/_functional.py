"""The model as a pure function of its selected parameters, and the torch.func primitives on it.

Everything here is functional: the user's parameters are only read (detached), buffers are cloned
so that a train-mode BatchNorm cannot move the user's running statistics, and no hook or ``.grad``
ever touches the model.

Shapes: ``B`` batch, ``C`` outputs, ``K`` columns of the loss-Hessian square root, ``P`` selected
parameters, ``P_live`` entries of the live tensors (see :mod:`curvop.params`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from curvop._kernels import differentiable_kernels
from curvop.likelihoods import Likelihood, TokenClassification
from curvop.params import ParameterSelection

__all__ = ["FunctionalModel", "Batch", "PendingBatch", "chunk_size"]

Params = tuple[Tensor, ...]


class FunctionalModel:
    """``module`` evaluated as ``f(theta, x)`` with ``theta`` the live parameter tensors.

    Args:
        module: The module to evaluate (the whole model, or its last layer).
        selection: Which of its parameters are live.
    """

    def __init__(self, module: nn.Module, selection: ParameterSelection) -> None:
        self.module = module
        self.selection = selection
        live = set(selection.names)
        # One walk in the order of `named_parameters` / `named_buffers` (modules once, each
        # tensor under its first name). `fixed`: the tensors that are not live, buffers cloned
        # (a train-mode BatchNorm updates the buffers it is given, not the user's). `slots`:
        # every slot of a module's `_parameters` / `_buffers` dict that holds a tensor, with the
        # name whose value it takes during `forward`: a tensor registered twice (tied weights)
        # fills two slots, a module registered twice has its slots once.
        fixed: dict[str, Tensor] = {}
        name_of: dict[int, str] = {}
        slots: list[tuple[dict, str, str]] = []
        rnn = False
        for prefix, m in module.named_modules():
            rnn = rnn or isinstance(m, nn.RNNBase)
            for d, buffers in ((m._parameters, False), (m._buffers, True)):
                for k, t in d.items():
                    if t is None:
                        continue
                    n = name_of.get(id(t))
                    if n is None:
                        n = name_of[id(t)] = f"{prefix}.{k}" if prefix else k
                        if buffers:
                            fixed[n] = t.detach().clone()
                        elif n not in live:
                            fixed[n] = t.detach()
                    slots.append((d, k, n))
        self.fixed = fixed
        self._slots = slots
        self._rnn = rnn

    def __call__(self, theta: Sequence[Tensor], x: Tensor) -> Tensor:
        """Output `(B, C)` of the module at parameters ``theta`` on inputs ``x``.

        Token-level outputs `(B, T, C)` come flattened to `(B, T·C)` (token-major): every
        per-sample primitive then sees one output vector per sequence.
        """
        f = self.forward(theta, x)
        return f.flatten(1) if f.dim() > 2 else f

    def forward(self, theta: Sequence[Tensor], x: Tensor) -> Tensor:
        """The module's output as it returns it (`(B, C)` or `(B, T, C)`).

        Every evaluation of the model runs here, inside
        :func:`~curvop._kernels.differentiable_kernels`: fused kernels without the derivatives
        curvop takes (fused attention, the MHA fast path, cuDNN RNNs) are swapped for composite
        ones, and the user's settings are restored on return.

        The tensors are swapped into the modules' parameter and buffer dicts for the call and
        the user's put back afterwards, which is what ``torch.func.functional_call`` does;
        written here because its name resolution and weight-tying analysis on every call cost
        more than a small model's forward pass (140 us against 150 us for a 3-layer MLP on one
        CPU thread), and it does not restore a module registered under two names.
        """
        values = dict(self.fixed)
        values.update(zip(self.selection.names, theta))
        slots = self._slots
        saved = [d[k] for d, k, _ in slots]
        with differentiable_kernels(self._rnn):
            try:
                for d, k, n in slots:
                    d[k] = values[n]
                return self.module(x)
            finally:
                for (d, k, _), t in zip(slots, saved):
                    d[k] = t

    def to(self, dtype: torch.dtype | None = None, device: torch.device | None = None
           ) -> FunctionalModel:
        """A copy whose fixed tensors are cast (floating ones only); the module is shared."""
        new = object.__new__(FunctionalModel)
        new.module, new.selection, new._slots = self.module, self.selection, self._slots
        new._rnn = self._rnn
        new.fixed = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                     for k, v in self.fixed.items()}
        return new

    def single(self, theta: Sequence[Tensor], xn: Tensor) -> Tensor:
        """Output `(C,)` of one sample ``xn`` (no batch dimension), for ``vmap`` over samples."""
        return self(theta, xn.unsqueeze(0)).squeeze(0)


def chunk_size(budget_bytes: int, bytes_per_item: int, total: int) -> int:
    """Largest chunk (at least 1, at most ``total``) whose items fit in ``budget_bytes``."""
    return max(1, min(total, budget_bytes // max(1, bytes_per_item)))


class _Samples:
    """What :class:`Batch` and :class:`PendingBatch` read alike from ``fm`` and ``x``."""

    fm: FunctionalModel
    x: Tensor

    @property
    def sel(self) -> ParameterSelection:
        """The parameter selection."""
        return self.fm.selection

    @property
    def size(self) -> int:
        """``B``."""
        return self.x.shape[0]


@dataclass
class Batch(_Samples):
    """One validated batch ready for the backends.

    Attributes:
        fm: The functional model (module + live selection).
        x: The module's inputs (the features ``phi`` for last-layer curvature), `(B, ...)`.
        y: Validated targets or ``None``.
        f: Outputs `(B, C)`, computed once without graph.
        likelihood: The likelihood (:class:`~curvop.likelihoods.TokenClassification` for
            token-level classification).
        budget: Working-memory budget in bytes for chunked computations.
        event_shape: The model's output shape per sample when it is not `(C,)` (token-level
            outputs `(T, C)`: ``f`` and regression targets are then flattened to `(B, T·C)`).
    """

    fm: FunctionalModel
    x: Tensor
    y: Tensor | None
    f: Tensor
    likelihood: Likelihood | TokenClassification
    budget: int
    event_shape: tuple[int, ...] | None = None
    theta: Params = field(init=False)

    def __post_init__(self) -> None:
        theta = self.fm.selection.detached()
        self.theta = tuple(t.to(device=self.f.device, dtype=self.f.dtype) for t in theta)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Batch:
        """The same batch with floating tensors cast to ``dtype`` / moved to ``device``."""
        if (dtype in (None, self.f.dtype)) and (device is None
                                                 or torch.device(device) == self.f.device):
            return self

        def cast(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return Batch(self.fm.to(dtype, device), cast(self.x), cast(self.y), cast(self.f),
                     self.likelihood, self.budget, self.event_shape)


    @property
    def itemsize(self) -> int:
        """Bytes per element of the parameters' dtype."""
        return self.theta[0].element_size()

    def loss(self) -> Tensor:
        """Summed loss of the batch (detached)."""
        return self.likelihood.loss(self.f, self.y).detach()

    def flat(self, tensors: Sequence[Tensor], batch_dims: int) -> Tensor:
        """Flatten per-parameter results and restrict them to the selection, `(*batch, P)`."""
        return self.sel.select(self.sel.flatten(tensors, batch_dims))

    def sample_chunks(self, bytes_per_sample: int) -> Iterator[slice]:
        """Slices over the batch whose per-sample results fit the budget."""
        n = chunk_size(self.budget, bytes_per_sample, self.size)
        for i in range(0, self.size, n):
            yield slice(i, min(i + n, self.size))

    # --- per-sample primitives (vmap over samples) ---------------------------------------

    def jacobians(self, rows: slice) -> Tensor:
        """Per-sample Jacobians of the outputs, `(n, C, P)` for the samples in ``rows``."""
        n, C = self.f[rows].shape
        eye = torch.eye(C, dtype=self.f.dtype, device=self.f.device)
        return self.sqrt_vjps(rows, eye.expand(n, C, C))

    def gradients(self, rows: slice) -> Tensor:
        """Per-sample gradients of the loss, `(n, P)`.

        Computed as ``J_nᵀ r_n`` with ``r_n`` the output gradient of sample ``n``'s loss.
        """
        r = self.likelihood.output_gradient(self.f[rows], self.y[rows])
        return self.sqrt_vjps(rows, r.unsqueeze(-1))[:, 0]

    def sqrt_vjps(self, rows: slice, S: Tensor) -> Tensor:
        """Per-sample ``S_nᵀ J_n`` for columns ``S`` `(n, C, K)`: `(n, K, P)`.

        ``vmap`` over samples and columns; modules that ``vmap`` cannot batch (``nn.LSTM``)
        fall back to a loop of plain backward passes.
        """

        def one(xn: Tensor, sn: Tensor) -> Params:
            _, pullback = vjp(lambda th: self.fm.single(th, xn), self.theta)
            return vmap(pullback)(sn.T)[0]

        try:
            out = vmap(one, randomness="different")(self.x[rows], S)
        except RuntimeError:
            return self._sqrt_vjps_loop(rows, S)
        return self.flat(out, 2)

    def sqrt_vjps_live(self, rows: slice, S: Tensor, slots: Sequence[int]) -> list[Tensor]:
        """Per-sample ``S_nᵀ J_n`` in the live tensors ``theta[slots]`` only.

        One `(n, K, *shape)` tensor per slot (live shapes, not restricted to the selection);
        the other parameters are held fixed, so no per-sample gradient is formed for them.
        """
        slots = list(slots)
        theta = list(self.theta)

        def one(xn: Tensor, sn: Tensor) -> Params:
            def fn(sub: Params) -> Tensor:
                th = list(theta)
                for i, t in zip(slots, sub):
                    th[i] = t
                return self.fm.single(th, xn)

            _, pullback = vjp(fn, tuple(theta[i] for i in slots))
            return vmap(pullback)(sn.T)[0]

        try:
            return list(vmap(one, randomness="different")(self.x[rows], S))
        except RuntimeError:
            pass
        leaves = [t.detach().requires_grad_() for t in theta]
        out: list[list[Tensor]] = [[] for _ in slots]
        with torch.enable_grad():
            for i, n in enumerate(range(*rows.indices(self.size))):
                fn = self.fm(leaves, self.x[n: n + 1])[0]
                cols: list[list[Tensor]] = [[] for _ in slots]
                for k in range(S.shape[-1]):
                    g = torch.autograd.grad(fn, [leaves[j] for j in slots], S[i, :, k],
                                            retain_graph=True, allow_unused=True)
                    for c, gi, j in zip(cols, g, slots):
                        c.append(torch.zeros_like(theta[j]) if gi is None else gi)
                for o, c in zip(out, cols):
                    o.append(torch.stack(c))
        return [torch.stack(o) for o in out]

    def _sqrt_vjps_loop(self, rows: slice, S: Tensor) -> Tensor:
        theta = [t.detach().requires_grad_() for t in self.theta]
        out = []
        with torch.enable_grad():
            for i, n in enumerate(range(*rows.indices(self.size))):
                fn = self.fm(theta, self.x[n: n + 1])[0]
                cols = []
                for k in range(S.shape[-1]):
                    g = torch.autograd.grad(fn, theta, S[i, :, k], retain_graph=True,
                                            allow_unused=True)
                    cols.append(self.flat([torch.zeros_like(t) if gi is None else gi
                                           for gi, t in zip(g, theta)], 0))
                out.append(torch.stack(cols))
        return torch.stack(out)

    # --- products over the whole batch (vmap over columns) -----------------------------

    def column_chunks(self, total: int | None = None) -> Iterator[slice]:
        """Slices over `P` columns whose products fit the budget together."""
        P = self.sel.num_params if total is None else total
        per_col = 4 * (self.sel.num_live + self.x.numel() + self.f.numel()) * self.itemsize
        n = chunk_size(self.budget, per_col, P)
        for i in range(0, P, n):
            yield slice(i, min(i + n, P))

    def unit_rows(self, cols: slice) -> Tensor:
        """Rows ``cols`` of the `(P, P)` identity, `(k, P)`."""
        E = self.f.new_zeros(cols.stop - cols.start, self.sel.num_params)
        E[:, cols] = torch.eye(cols.stop - cols.start, dtype=E.dtype, device=E.device)
        return E

    def materialise(self, product: Callable[[Tensor], Tensor]) -> Tensor:
        """A symmetric `(P, P)` matrix from products with chunks of identity rows."""
        P = self.sel.num_params
        H = self.f.new_empty(P, P)
        for cols in self.column_chunks():
            H[cols] = product(self.unit_rows(cols))
        return H

    def diagonal_by_columns(self, product: Callable[[Tensor], Tensor]) -> Tensor:
        """The diagonal `(P,)` from products with identity rows, keeping only diagonal entries."""
        h = self.f.new_empty(self.sel.num_params)
        for cols in self.column_chunks():
            h[cols] = product(self.unit_rows(cols)).diagonal(offset=cols.start)
        return h

    def unflat_columns(self, V: Tensor) -> Params:
        """Columns `(k, P)` in the selected space → per-parameter tangents `(k, *shape)`."""
        return tuple(self.sel.unflatten(self.sel.embed(V)))

    def hvp_columns(self, V: Tensor) -> Tensor:
        """Hessian of the loss times each row of ``V`` `(k, P)`: `(k, P)`."""

        def loss_fn(th: Params) -> Tensor:
            return self.likelihood.loss(self.fm(th, self.x), self.y)

        def hvp(v: Params) -> Params:
            return jvp(grad(loss_fn), (self.theta,), (v,))[1]

        out = vmap(hvp, randomness="same")(self.unflat_columns(V))
        return self.flat(out, 1)

    def ggn_columns(self, V: Tensor, output_hessian: Callable[[Tensor], Tensor]) -> Tensor:
        """``Jᵀ Λ J`` times each row of ``V`` `(k, P)`: `(k, P)`.

        ``output_hessian`` maps `(k, B, C)` to `(k, B, C)`.
        """

        def fwd(th: Params) -> Tensor:
            return self.fm(th, self.x)

        def jv(v: Params) -> Tensor:
            return jvp(fwd, (self.theta,), (v,))[1]

        JV = vmap(jv, randomness="same")(self.unflat_columns(V))
        _, pullback = vjp(fwd, self.theta)
        out = vmap(pullback)(output_hessian(JV))[0]
        return self.flat(out, 1)


class PendingBatch(_Samples):
    """A validated batch whose outputs are still to come: from the caller's own forward pass.

    The curvatures that run a forward pass with a graph anyway (KFAC's tapped pass) take the
    outputs from it instead of a separate forward without graph: :meth:`complete` turns the
    outputs into the :class:`Batch` (checking them and the targets), and
    :meth:`forward_without_graph` is the plain route for callers that need ``f`` first.

    Args:
        fm: The functional model.
        x: The module's inputs.
        finish: Validates the raw outputs (`(B, C)` or `(B, T, C)`, detached) and builds the
            :class:`Batch`.
        budget: Working-memory budget in bytes.
        guard: Context manager factory wrapping every forward pass (randomness check).
    """

    def __init__(self, fm: FunctionalModel, x: Tensor, finish: Callable[[Tensor], Batch],
                 budget: int, guard: Callable[[], object]) -> None:
        self.fm, self.x, self.budget = fm, x, budget
        self._finish, self.guard = finish, guard
        self.theta: Params = fm.selection.detached()
        self.batch: Batch | None = None  # set by complete()
        self.S: Tensor | None = None  # set by the tapped pass that completes the batch


    def complete(self, f: Tensor) -> Batch:
        """The :class:`Batch` for raw outputs ``f`` (from a forward at ``theta``)."""
        self.batch = self._finish(f.detach())
        return self.batch

    def forward_without_graph(self) -> Batch:
        """:meth:`complete` after a forward pass without graph."""
        with torch.no_grad(), self.guard():
            f = self.fm.forward(self.theta, self.x)
        return self.complete(f)

    def settled(self, sqrt: Callable[[Batch], Tensor]) -> tuple[Batch, Tensor]:
        """The completed batch and its ``S``.

        If no tapped pass completed the batch (nothing to tap), the outputs come from a forward
        without graph and ``S = sqrt(batch)``.
        """
        if self.batch is None:
            self.S = sqrt(self.forward_without_graph())
        return self.batch, self.S

    def loss(self) -> Tensor:
        """Summed loss of the completed batch (detached)."""
        if self.batch is None:
            raise RuntimeError("PendingBatch.loss before the outputs were computed")
        return self.batch.loss()
