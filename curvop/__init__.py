"""curvop: curvature of neural-network losses as lazy linear operators."""

from curvop.curvature import (
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
from curvop.operators import EFLinearOperator, GGNLinearOperator, HessianLinearOperator

__all__ = [
    "CurvatureInterface",
    "GGNInterface",
    "EFInterface",
    "TorchGGN",
    "TorchEF",
    "TorchHessian",
    "FeatureExtractor",
    "Likelihood",
    "GGNLinearOperator",
    "EFLinearOperator",
    "HessianLinearOperator",
    "to_scipy",
]

__version__ = "0.1.0"
