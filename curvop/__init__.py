"""curvop: curvature of neural-network losses as lazy linear operators."""

from curvop.curvature import (
    AsdlEF,
    AsdlGGN,
    AsdlHessian,
    AsdlInterface,
    BackPackEF,
    BackPackGGN,
    BackPackInterface,
    CurvatureInterface,
    EFInterface,
    GGNInterface,
    TorchEF,
    TorchGGN,
    TorchHessian,
)
from curvop.feature_extractor import FeatureExtractor
from curvop.interop import to_scipy
from curvop.likelihoods import Likelihood
from curvop.operators import (
    DampedKron,
    EFLinearOperator,
    GGNLinearOperator,
    HessianLinearOperator,
    Kron,
    KronAddedDiag,
    cuda_graphs_enabled,
    use_cuda_graphs,
)

__all__ = [
    "CurvatureInterface",
    "GGNInterface",
    "EFInterface",
    "TorchGGN",
    "TorchEF",
    "TorchHessian",
    "BackPackInterface",
    "BackPackGGN",
    "BackPackEF",
    "AsdlInterface",
    "AsdlGGN",
    "AsdlEF",
    "AsdlHessian",
    "FeatureExtractor",
    "Likelihood",
    "GGNLinearOperator",
    "EFLinearOperator",
    "HessianLinearOperator",
    "to_scipy",
    "Kron",
    "DampedKron",
    "KronAddedDiag",
    "use_cuda_graphs",
    "cuda_graphs_enabled",
]

__version__ = "0.1.0"
