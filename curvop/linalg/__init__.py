"""Linear algebra on curvature operators that linear_operator, torch and scipy lack."""

from curvop.linalg.eigen import low_rank_operator, top_eigenpairs

__all__ = ["top_eigenpairs", "low_rank_operator"]
