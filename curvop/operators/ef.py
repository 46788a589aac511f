r"""EFLinearOperator: the empirical Fisher of one batch, matrix-free.

Since :math:`g_n = J_n^\top r_n` with :math:`r_n = \partial \ell_n / \partial f_n`,

.. math::

    F = \sum_n g_n g_n^\top = \sum_n J_n^\top r_n r_n^\top J_n,

a square-root form with one column per sample: the products and the diagonal are the GGN's.
"""

from __future__ import annotations

from torch import Tensor

from curvop._functional import Batch
from curvop._sqrt_form import ef_sqrt
from curvop.operators.ggn import GGNLinearOperator

__all__ = ["EFLinearOperator"]


class EFLinearOperator(GGNLinearOperator):
    """The empirical Fisher as a `(P, P)` LinearOperator.

    Args:
        *theta: Live parameter tensors (detached).
        batch: The batch (with targets).
        S: Optional; the output gradients `(B, C, 1)` (computed from the batch when omitted).
        cache: Internal: the linearisation, shared by the copies linear_operator rebuilds
            inside every product. Leave it out.
    """

    def __init__(self, *theta: Tensor, batch: Batch, S: Tensor | None = None,
                 cache: dict | None = None) -> None:
        super().__init__(*theta, batch=batch, S=ef_sqrt(batch) if S is None else S,
                         cache=cache)
