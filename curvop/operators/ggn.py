r"""GGNLinearOperator: the exact GGN or MC Fisher of one batch, matrix-free.

.. math::

    G = \sum_n J_n^\top S_n S_n^\top J_n,

with :math:`S_n S_n^\top = \Lambda_n` (exact) or ``K`` sampled output gradients over
:math:`\sqrt{K}` (MC Fisher; drawn once, at construction, so repeated products agree).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvop._functional import Batch
from curvop._model_guard import model_guard
from curvop._sqrt_form import sqrt_form_diag, sqrt_form_full
from curvop.operators._base import CurvatureLinearOperator
from curvop.operators._products import SqrtFormProducts

__all__ = ["GGNLinearOperator"]


class GGNLinearOperator(CurvatureLinearOperator):
    """A curvature of square-root form ``Σ_n J_nᵀ S_n S_nᵀ J_n`` as a `(P, P)` LinearOperator.

    Built by :meth:`~curvop.curvature.GGNInterface.full_operator`; products cost one
    Jacobian-vector and one vector-Jacobian product through cached graphs.

    Args:
        *theta: Live parameter tensors (detached).
        batch: The batch.
        S: Square-root columns `(B, C, K)`.
        cache: Internal: the linearisation, shared by the copies linear_operator rebuilds
            inside every product. Leave it out.
    """

    def __init__(self, *theta: Tensor, batch: Batch, S: Tensor, cache: dict | None = None
                 ) -> None:
        super().__init__(*theta, batch=batch, S=S, cache=cache)
        self._S = S.to(dtype=self.dtype, device=self.device)

    def _make_products(self) -> SqrtFormProducts:
        return SqrtFormProducts(self._batch, self._S)

    @torch.no_grad()
    def _diagonal(self) -> Tensor:
        with model_guard(self._batch.fm.module):
            return sqrt_form_diag(self._batch, self._S.detach())

    @torch.no_grad()
    def to_dense(self) -> Tensor:
        """The dense `(P, P)` matrix, assembled from per-sample products (no `P` products).

        Returns:
            A `(P, P)` tensor of the operator's dtype and device.

        Raises:
            MemoryBudgetError: If it cannot fit.
        """
        if self._P < self._S.shape[-1]:
            return super().to_dense()
        return sqrt_form_full(self._batch, self._S.detach())
