"""The LinearOperator contract for model-backed curvature operators, written once.

``linear_operator`` reads ``device``/``dtype`` from the first positional argument and rebuilds
operators as ``cls(*self._args, **self._kwargs)`` (in ``.to()``, ``.detach()``, solves), so the
positional arguments are the detached live parameter tensors only, and everything else — the
batch (model, inputs, outputs), the square-root columns — travels as keyword arguments.
``.to(dtype)`` therefore yields an operator that evaluates the model in that dtype, without
touching the user's model.

The operator is a curvature *at* fixed parameters: products are differentiable in the right-hand
side, but no gradient flows to the parameters (their ``.grad`` stays ``None``); the arguments are
curvop's own detached copies, so ``requires_grad_`` never reaches the user's model. Batch
dimensions do not exist for it; the batch and indexing hooks raise a clear
:class:`~curvop.errors.NotSupportedError`, except element access, which is answered through
products with unit vectors (what pivoted-Cholesky preconditioners need).
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from curvop import _checks
from curvop._functional import Batch, chunk_size
from curvop.errors import NotSupportedError
from curvop.operators._graphs import linearized
from curvop.operators._graphs import matmat as graphed_matmat

__all__ = ["CurvatureLinearOperator", "entries_by_products"]

_BATCH = ("{cls} is a single `(P, P)` curvature matrix and has no batch dimensions; {what} "
          "is not supported")


def entries_by_products(op: LinearOperator, row_index, col_index) -> Tensor:
    """Entries ``op[row, col]`` of a symmetric matrix-free operator.

    One product per distinct column: what linear_operator's pivoted-Cholesky preconditioner asks.
    """
    rows, cols = torch.broadcast_tensors(torch.as_tensor(row_index, device=op.device),
                                         torch.as_tensor(col_index, device=op.device))
    P = op.shape[-1]
    uniq, inverse = torch.unique(cols, return_inverse=True)
    E = torch.zeros(uniq.numel(), P, dtype=op.dtype, device=op.device)
    E[torch.arange(uniq.numel(), device=op.device), uniq] = 1
    columns = op._matmul(E.T).T  # (u, P): row i is column uniq[i] (symmetric)
    return columns[inverse, rows]


class _CheckedMatmul:
    """``matmul`` for curvop's operators: ``other`` is checked before any work.

    Shared by :class:`CurvatureLinearOperator` and the data-set operator; the class needs
    ``_P`` (the side) and ``_matmul``.
    """

    def matmul(self, other):
        """``self @ other`` with ``other`` checked first (length, dtype, device).

        Args:
            other: A tensor of shape `(P,)`, `(P, k)` or `(..., P, k)` of the operator's dtype
                and device, or a LinearOperator with ``P`` rows.

        Returns:
            The product, shaped like ``other``.

        Raises:
            InputError: If ``other`` does not have `P` rows or is on another device (or, for
                a data-set operator, the loader changed since the first pass).
            InputTypeError: If it has another dtype.
        """
        if isinstance(other, Tensor):
            _checks.check_vector(other, self._P, self.dtype, self.device)
            if not (other.requires_grad and torch.is_grad_enabled()):
                # nothing to differentiate: skip linear_operator's autograd Function, which
                # rebuilds the operator from its arguments on every call
                return self._matmul(other)
        return super().matmul(other)

    def __matmul__(self, other):
        return self.matmul(other)


class CurvatureLinearOperator(_CheckedMatmul, LinearOperator):
    """Base of the model-backed operators: products, chunking, checks, batch hooks.

    Subclasses implement :meth:`_make_products` (an object with ``matmat(V (k, P)) -> (k, P)``)
    and :meth:`_diagonal`; they may override :meth:`to_dense` with a faster assembly.

    Args:
        *theta: The live parameter tensors (detached), as ``linear_operator`` wants them.
        batch: The :class:`~curvop._functional.Batch` the curvature is taken on.
        cache: Internal: the linearisation, shared by the copies linear_operator rebuilds
            inside every product. Leave it out.
        **kwargs: Further keyword arguments of the subclass (tensors such as ``S``).

    Raises:
        NotSupportedError: If there is no parameter tensor.
    """

    def __init__(self, *theta: Tensor, batch: Batch, cache: dict | None = None,
                 **kwargs) -> None:
        if not theta:
            raise NotSupportedError("a curvature operator needs at least one parameter tensor")
        batch = batch.to(dtype=theta[0].dtype, device=theta[0].device)
        # linear_operator rebuilds the operator from its arguments inside every matmul
        # (representation_tree): the linearisation lives in a dict shared by all rebuilds
        cache = {} if cache is None else cache
        super().__init__(*theta, batch=batch, cache=cache, **kwargs)
        self._batch = batch
        self._P = batch.sel.num_params
        self._shared = cache
        #: replay repeated products as CUDA graphs (see _graphs); the data-set operator turns
        #: it off for its per-batch operators, whose graphs would each hold their own memory
        self._cuda_graphs = True

    # --- products ----------------------------------------------------------------------

    def _make_products(self):
        raise NotImplementedError

    @property
    def products(self):
        """The cached linearisation (built on the first product), per dtype and device."""
        key = (self.dtype, self.device)
        if key not in self._shared:
            self._shared[key] = linearized(self._make_products, self.device)
        return self._shared[key]

    def linearize(self) -> CurvatureLinearOperator:
        """Build the cached linearisation now (else the first product does).

        Returns:
            ``self``, for chaining (``op = iface.full_operator(x, y)[1].linearize()``).
        """
        _ = self.products
        return self

    def _matmul(self, rhs: Tensor) -> Tensor:
        P = self._P
        if rhs.dim() == 1:
            cols = rhs.unsqueeze(0)
        else:
            # columns as contiguous rows, copied once here: split into parameters, strided
            # rows would be copied per parameter and again inside the products (a 16-column
            # matmat of the 270k-parameter MLP: 150 ms against 119 ms)
            cols = rhs.movedim(-2, -1).reshape(-1, P).contiguous()
        b = self._batch
        per_col = 6 * (b.sel.num_live + b.f.numel()) * b.itemsize + b.x.numel() * b.itemsize
        n = chunk_size(b.budget, per_col, cols.shape[0])
        products = self.products
        # on a GPU, repeated products of one shape are replayed as CUDA graphs (see _graphs)
        run = graphed_matmat if self._cuda_graphs else (lambda p, V: p.matmat(V))
        if n >= cols.shape[0]:
            out = run(products, cols)
        else:
            out = torch.cat([run(products, cols[i: i + n]) for i in range(0, cols.shape[0], n)])
        if rhs.dim() == 1:
            return out[0]
        return out.reshape(*rhs.shape[:-2], rhs.shape[-1], P).movedim(-1, -2)

    # --- structure ---------------------------------------------------------------------

    def _size(self) -> torch.Size:
        return torch.Size([self._P, self._P])

    def _transpose_nonbatch(self) -> CurvatureLinearOperator:
        return self

    def _get_indices(self, row_index, col_index, *batch_indices) -> Tensor:
        if batch_indices:
            raise NotSupportedError(_BATCH.format(cls=type(self).__name__, what="batch indexing"))
        return entries_by_products(self, row_index, col_index)

    def _getitem(self, row_index, col_index, *batch_indices):
        if batch_indices:
            raise NotSupportedError(_BATCH.format(cls=type(self).__name__, what="batch indexing"))
        return super()._getitem(row_index, col_index)

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor):
        return (None,) * len(self.representation())

    def _expand_batch(self, batch_shape):
        if tuple(batch_shape) == ():
            return self
        raise NotSupportedError(_BATCH.format(cls=type(self).__name__,
                                              what=f"expanding to {tuple(batch_shape)}"))

    def _unsqueeze_batch(self, dim: int):
        raise NotSupportedError(_BATCH.format(cls=type(self).__name__, what="unsqueeze"))

    def _permute_batch(self, *dims: int):
        raise NotSupportedError(_BATCH.format(cls=type(self).__name__, what="permute"))

    def _sum_batch(self, dim: int):
        raise NotSupportedError(_BATCH.format(cls=type(self).__name__, what="sum over batch"))

    def _prod_batch(self, dim: int):
        raise NotSupportedError(_BATCH.format(cls=type(self).__name__, what="prod over batch"))

    def to_dense(self) -> Tensor:
        """The dense `(P, P)` matrix (from products with identity columns unless overridden).

        Returns:
            A `(P, P)` tensor of the operator's dtype and device.

        Raises:
            MemoryBudgetError: If it cannot fit.
        """
        _checks.check_fits((self._P, self._P), self.dtype, self.device, "the dense operator")
        return self._batch.materialise(self.products.matmat)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(P={self._P}, dtype={self.dtype}, device={self.device})"
