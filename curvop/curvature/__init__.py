"""Curvature interfaces (laplace-torch's ``laplace.curvature`` API) and their backends."""

from curvop.curvature.asdl import AsdlEF, AsdlGGN, AsdlHessian, AsdlInterface
from curvop.curvature.backpack import BackPackEF, BackPackGGN, BackPackInterface
from curvop.curvature.interface import CurvatureInterface, EFInterface, GGNInterface
from curvop.curvature.registry import BACKENDS
from curvop.curvature.torch_func import TorchEF, TorchGGN, TorchHessian

__all__ = [
    "BACKENDS",
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
]
