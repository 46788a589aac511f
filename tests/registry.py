"""The backends under test: read from curvop's own registry, so a new backend is tested at once."""

from curvop.curvature import BACKENDS


def backend_ids() -> list[str]:
    return list(BACKENDS)


def backend_kinds() -> list[tuple[str, str]]:
    """Every (backend, kind) pair the registry has: SPEC gives BackPACK no Hessian class."""
    return [(b, k) for b, kinds in BACKENDS.items() for k in kinds]
