"""Bridges to other libraries."""

from curvop.interop.scipy import to_scipy

__all__ = ["to_scipy"]
