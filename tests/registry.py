"""The backends under test: read from curvop's own registry, so a new backend is tested at once."""

from curvop.curvature import BACKENDS


def backend_ids() -> list[str]:
    return list(BACKENDS)
