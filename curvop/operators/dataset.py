r"""DatasetLinearOperator: a curvature summed over every batch of a data loader, matrix-free.

.. math::

    H = \sum_{b} H_b, \qquad H_b \text{ the curvature of batch } b,

products stream the batches and sum. Per-batch linearisations are kept when they fit the memory
budget (products then cost no forward pass), else rebuilt on every pass; the Monte-Carlo labels
of each batch are drawn once and kept either way, so repeated products agree. Every pass checks
that the loader yields the same data in the same order (a fingerprint per batch) and raises
otherwise: a shuffling loader would silently give a different matrix on every product.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor
from tqdm import tqdm

from curvop import _checks
from curvop.errors import InputError, InputTypeError, NotSupportedError
from curvop.operators._base import _CheckedMatmul, entries_by_products

__all__ = ["DatasetLinearOperator"]


def _fingerprint(x: Tensor, y: Tensor) -> tuple:
    """A cheap fingerprint of a batch: shapes and a few order-sensitive sums."""
    xf = x.detach().reshape(x.shape[0], -1).double()
    w = torch.arange(1, x.shape[0] + 1, dtype=torch.float64, device=x.device)
    return (tuple(x.shape), tuple(y.shape), float((xf.sum(1) * w).sum()),
            float((y.detach().reshape(y.shape[0], -1).double().sum(1) * w).sum()))


class DatasetLinearOperator(_CheckedMatmul, LinearOperator):
    """The curvature of ``interface`` summed over the batches of ``loader``, `(P, P)`.

    Build it with :meth:`curvop.CurvatureInterface.dataset_operator`.

    Args:
        *theta: The live parameter tensors (detached); ``linear_operator`` reads dtype/device
            from them.
        interface: A curvature interface (``TorchGGN``, ``TorchEF``, ``TorchHessian``, ...).
        loader: An iterable of ``(x, y)`` batches, re-iterable, same order on every pass.
        cache: Keep per-batch linearisations (``None``: while they fit ``memory_budget``).
        progress: Show a tqdm bar per pass (``None``: for loaders of more than 10 batches).
        state: Internal: the first pass's results, shared by the copies linear_operator
            rebuilds inside every product. Leave it out.

    Raises:
        InputTypeError: If ``loader`` yields something other than ``(x, y)`` pairs.
        InputError: If the loader is empty or changes between passes.
    """

    def __init__(self, *theta: Tensor, interface, loader: Iterable, cache: bool | None = None,
                 progress: bool | None = None, state: dict | None = None) -> None:
        # linear_operator rebuilds the operator inside every matmul: the first pass's results
        # live in `state`, shared by the rebuilds
        state = {} if state is None else state
        super().__init__(*theta, interface=interface, loader=loader, cache=cache,
                         progress=progress, state=state)
        self._iface, self._loader = interface, loader
        self._progress = progress
        self._cache = cache
        self._P = interface.num_params
        self._state = state
        if "batches" not in state:
            self._first_pass()
        self._batches: list[dict] = state["batches"]

    # --- passes over the data -------------------------------------------------------------

    def _iterate(self, desc: str):
        n = len(self._batches) if self._batches else (
            len(self._loader) if hasattr(self._loader, "__len__") else None)
        show = self._progress if self._progress is not None else (n or 0) > 10
        for i, item in enumerate(tqdm(self._loader, desc=desc, total=n, disable=not show,
                                      leave=False)):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise InputTypeError("`loader` must yield (x, y) pairs; got "
                                     f"{type(item).__name__} at batch {i}")
            yield i, item[0], item[1]

    def _first_pass(self) -> None:
        loss = 0.0
        used = 0
        self._batches = []
        for _, x, y in self._iterate("curvature (first pass)"):
            batch_loss, op = self._iface.full_operator(x, y)
            op._cuda_graphs = False  # a graph per batch would hold memory per batch
            entry = {"fp": _fingerprint(x, y), "S": getattr(op, "_S", None), "op": op}
            loss = loss + batch_loss
            used += x.numel() * x.element_size() * 8
            keep = (self._cache if self._cache is not None
                    else used <= self._iface._working_budget(x.device))
            if not keep:
                entry["op"] = None
            self._batches.append(entry)
        if not self._batches:
            raise InputError("`loader` yielded no batch")
        self._state.update(batches=self._batches, loss=loss)

    def _ops(self):
        """Per-batch operators, rebuilt where not cached, with the data order checked."""
        seen = 0
        for i, x, y in self._iterate("curvature product"):
            if i >= len(self._batches) or _fingerprint(x, y) != self._batches[i]["fp"]:
                raise InputError(
                    f"`loader` yielded different data at batch {i} than on the first pass; "
                    "use a loader with a fixed order (shuffle=False) for a data-set operator")
            entry = self._batches[i]
            op = entry["op"]
            if op is None:
                op = self._iface._rebuild_operator(x, y, entry["S"])
                op._cuda_graphs = False
            seen += 1
            yield op
        if seen != len(self._batches):
            raise InputError(f"`loader` yielded {seen} batches, {len(self._batches)} before")

    @property
    def loss(self) -> Tensor:
        """The summed loss over the loader (from the first pass)."""
        return self._state["loss"]

    # --- LinearOperator contract ------------------------------------------------------------

    def _matmul(self, rhs: Tensor) -> Tensor:
        total = None
        for op in self._ops():
            out = op._matmul(rhs)
            total = out if total is None else total + out
        return total

    def _diagonal(self) -> Tensor:
        return sum(op._diagonal() for op in self._ops())

    def to_dense(self) -> Tensor:
        """The dense `(P, P)` sum (each batch assembled its own cheapest way).

        Returns:
            A `(P, P)` tensor of the operator's dtype and device.

        Raises:
            MemoryBudgetError: If the `(P, P)` matrix does not fit (raised before allocating).
        """
        _checks.check_fits((self._P, self._P), self.dtype, self.device, "the dense operator")
        return sum(op.to_dense() for op in self._ops())

    def _size(self) -> torch.Size:
        return torch.Size([self._P, self._P])

    def _transpose_nonbatch(self) -> DatasetLinearOperator:
        return self

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor):
        return (None,) * len(self.representation())

    def _get_indices(self, row_index, col_index, *batch_indices) -> Tensor:
        """Entries ``A[row, col]`` by products: one per distinct index of the sparser side.

        The operator is symmetric, so a row is a column: linear_operator's pivoted Cholesky
        asks for one whole row (``A[i, :]``), which costs one product, not `P`.
        """
        if batch_indices:
            raise NotSupportedError("a data-set curvature has no batch dimensions")
        rows, cols = torch.broadcast_tensors(torch.as_tensor(row_index, device=self.device),
                                             torch.as_tensor(col_index, device=self.device))
        if torch.unique(rows).numel() < torch.unique(cols).numel():
            rows, cols = cols, rows  # A[r, c] = A[c, r]
        return entries_by_products(self, rows, cols)

    def _getitem(self, row_index, col_index, *batch_indices):
        if batch_indices:
            raise NotSupportedError("a data-set curvature has no batch dimensions")
        return super()._getitem(row_index, col_index)

    def _expand_batch(self, batch_shape):
        if tuple(batch_shape) == ():
            return self
        raise NotSupportedError("a data-set curvature has no batch dimensions")

    def _unsqueeze_batch(self, dim: int):
        raise NotSupportedError("a data-set curvature has no batch dimensions")
