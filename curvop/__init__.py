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
from curvop.likelihoods import Likelihood

__all__ = [
    "CurvatureInterface",
    "GGNInterface",
    "EFInterface",
    "TorchGGN",
    "TorchEF",
    "TorchHessian",
    "FeatureExtractor",
    "Likelihood",
]

__version__ = "0.1.0"
