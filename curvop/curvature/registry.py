"""The one registry of backends: name → {"ggn", "ef", "hessian"} → interface class.

Read by :mod:`curvop.compat.laplace`, the tests and the benchmarks. The optional backends'
modules import without their library installed; their classes raise an ``ImportError`` naming
the extra to install on first use.
"""

from __future__ import annotations

import importlib

from curvop.curvature.interface import CurvatureInterface
from curvop.curvature.torch_func import TorchEF, TorchGGN, TorchHessian

__all__ = ["BACKENDS", "OPTIONAL_BACKEND_MODULES"]

#: backend name (``"torch"``, ``"backpack"``, ``"asdl"``) → kind (``"ggn"``, ``"ef"``,
#: ``"hessian"``) → interface class; the optional backends are registered on import
BACKENDS: dict[str, dict[str, type[CurvatureInterface]]] = {
    "torch": {"ggn": TorchGGN, "ef": TorchEF, "hessian": TorchHessian},
}

#: backend name → (module, {kind: class name}); registered when the module exists
OPTIONAL_BACKEND_MODULES = {
    "backpack": ("curvop.curvature.backpack", {"ggn": "BackPackGGN", "ef": "BackPackEF"}),
    "asdl": ("curvop.curvature.asdl",
             {"ggn": "AsdlGGN", "ef": "AsdlEF", "hessian": "AsdlHessian"}),
}


def _register_optional() -> None:
    for name, (module_name, classes) in OPTIONAL_BACKEND_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # the backend's curvop module is not written yet
            if err.name != module_name:
                raise
            continue
        BACKENDS[name] = {kind: getattr(module, cls) for kind, cls in classes.items()}


_register_optional()
