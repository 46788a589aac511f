"""Lazy curvature operators (``linear_operator.LinearOperator`` subclasses)."""

from curvop.operators.ef import EFLinearOperator
from curvop.operators.ggn import GGNLinearOperator
from curvop.operators.hessian import HessianLinearOperator

__all__ = ["GGNLinearOperator", "EFLinearOperator", "HessianLinearOperator"]
