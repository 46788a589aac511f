"""``to_scipy``: any LinearOperator (or square tensor) as a ``scipy.sparse.linalg.LinearOperator``.

Numpy in, numpy out; products run in torch on the operator's device (a GPU included), and only
the vectors cross to the host.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg
import torch
from linear_operator.operators import LinearOperator

from curvop._checks import check_square_operator

__all__ = ["to_scipy"]


def to_scipy(op: LinearOperator | torch.Tensor, dtype: np.dtype | type = np.float64
             ) -> scipy.sparse.linalg.LinearOperator:
    """Wrap ``op`` for ``scipy.sparse.linalg`` (``cg``, ``minres``, ``eigsh``, ``lobpcg``, ...).

    Args:
        op: A square `(P, P)` ``LinearOperator`` or tensor.
        dtype: The numpy dtype scipy sees (``float64`` unless asked otherwise); vectors are
            cast to ``op``'s torch dtype for the product and back.

    Returns:
        A ``scipy.sparse.linalg.LinearOperator`` of shape `(P, P)`, symmetric like ``op``.

    Raises:
        InputTypeError: If ``op`` is neither a LinearOperator nor a tensor.
        InputError: If it is not a square 2-D operator.

    Example:
        >>> import torch, scipy.sparse.linalg
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> x, info = scipy.sparse.linalg.cg(to_scipy(A), [1.0, 2.0, 3.0])
        >>> x.round(6).tolist(), info
        ([1.0, 1.0, 1.0], 0)
    """
    op = check_square_operator(op)
    P = op.shape[0]
    torch_dtype, device = op.dtype, op.device
    np_dtype = np.dtype(dtype)

    def matmat(X: np.ndarray) -> np.ndarray:
        V = torch.as_tensor(np.asarray(X), device=device).to(torch_dtype)
        with torch.no_grad():
            out = op.matmul(V.reshape(P, -1))
        return out.detach().cpu().numpy().astype(np_dtype, copy=False).reshape(X.shape)

    return scipy.sparse.linalg.LinearOperator(
        (P, P), matvec=matmat, rmatvec=matmat, matmat=matmat, rmatmat=matmat, dtype=np_dtype)
