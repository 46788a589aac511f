"""The one registry of backends: name → {"ggn", "ef", "hessian"} → interface class.

Read by :mod:`curvop.compat.laplace`, the tests and the benchmarks. Optional backends register
themselves here when their module is importable.
"""

from __future__ import annotations

from curvop.curvature.interface import CurvatureInterface
from curvop.curvature.torch_func import TorchEF, TorchGGN, TorchHessian

__all__ = ["BACKENDS"]

BACKENDS: dict[str, dict[str, type[CurvatureInterface]]] = {
    "torch": {"ggn": TorchGGN, "ef": TorchEF, "hessian": TorchHessian},
}
