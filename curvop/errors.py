"""Exception types raised by curvop.

Every exception is a subclass of a builtin type, so ``except ValueError`` in user code keeps
working; the subclasses let callers tell curvop's own checks from errors deeper in torch.
"""

from __future__ import annotations

__all__ = [
    "CurvopError",
    "InputError",
    "InputTypeError",
    "NotSupportedError",
    "MemoryBudgetError",
]


class CurvopError(Exception):
    """Base class of every exception raised by curvop itself."""


class InputError(CurvopError, ValueError):
    """A user-supplied argument has the right type but a wrong value (shape, range, finiteness)."""


class InputTypeError(CurvopError, TypeError):
    """A user-supplied argument has the wrong type."""


class NotSupportedError(CurvopError, NotImplementedError):
    """The requested computation is not available for this backend, model or layer."""


class MemoryBudgetError(CurvopError, MemoryError):
    """A materialisation would not fit in memory; raised before anything large is allocated."""
