"""Lazy curvature operators (``linear_operator.LinearOperator`` subclasses)."""

from curvop.operators._graphs import cuda_graphs_enabled, use_cuda_graphs
from curvop.operators.ef import EFLinearOperator
from curvop.operators.ggn import GGNLinearOperator
from curvop.operators.hessian import HessianLinearOperator
from curvop.operators.kron import Kron
from curvop.operators.kron_damped import DampedKron, KronAddedDiag

__all__ = [
    "GGNLinearOperator",
    "EFLinearOperator",
    "HessianLinearOperator",
    "Kron",
    "DampedKron",
    "KronAddedDiag",
    "use_cuda_graphs",
    "cuda_graphs_enabled",
]
