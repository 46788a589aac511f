r"""HessianLinearOperator: :math:`\nabla^2_\theta \ell` of one batch, matrix-free."""

from __future__ import annotations

from torch import Tensor

from curvop.operators._base import CurvatureLinearOperator
from curvop.operators._products import HessianProducts

__all__ = ["HessianLinearOperator"]


class HessianLinearOperator(CurvatureLinearOperator):
    """The Hessian of the summed loss as a `(P, P)` LinearOperator.

    Products are reverse-over-reverse through the cached gradient graph (forward-over-reverse
    where double backward is missing). The exact diagonal costs `P` products (in chunks).

    Args:
        *theta: Live parameter tensors (detached).
        batch: The batch (with targets).
    """

    def _make_products(self) -> HessianProducts:
        return HessianProducts(self._batch)

    def _diagonal(self) -> Tensor:
        return self._batch.diagonal_by_columns(self.products.matmat)
