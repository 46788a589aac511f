"""Cross-check of an entry's result against the task's curvop reference (``--check``).

Timing says nothing about correctness, so with ``--check`` every entry's output is brought
to a common form (a vector for diagonals and products, a matrix for dense and Kronecker
results, `(B, P, C)` for Jacobians) and compared with the output of the curvop reference
entry of its task on a fresh copy of the problem. Monte-Carlo tasks are not compared. Meant
for ``--quick`` problems, where dense forms are small.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from benchmarks.problems import Problem

__all__ = ["CHECKED_TASKS", "COVERAGE_TASKS", "covered_params", "relative_error",
           "to_common_form"]

CHECKED_TASKS = frozenset({
    "diag_ggn", "diag_ef", "jacobians", "full_ggn", "full_ef", "full_hessian", "ggn_product",
    "matmat16", "hvp", "ef_product", "kfac_exact",
})  # fmt: skip
"""Deterministic tasks whose results are compared."""

COVERAGE_TASKS = frozenset({"kfac_exact", "kfac_mc"})
"""Tasks whose results are always checked to cover all `P` parameters (see
:func:`covered_params`): some libraries silently leave out layers they do not support."""

_MAX_DENSE = 4096


def covered_params(out: Any) -> int | None:
    """Number of parameters a Kronecker-factored result covers (``None``: unknown format).

    Args:
        out: What a KFAC entry's thunk returned: ``(loss, Kron)`` of curvop or laplace-torch,
            a curvlinops ``KFACLinearOperator``, or BackPACK's per-parameter factor lists.

    Returns:
        The dimension of the block-diagonal matrix the result represents.
    """
    if isinstance(out, tuple) and len(out) == 2:
        out = out[1]
    if hasattr(out, "kfacs"):  # laplace.utils.Kron
        return sum(math.prod(int(f.shape[0]) for f in block) for block in out.kfacs)
    if isinstance(out, list) and all(isinstance(b, list) for b in out):  # BackPACK
        return sum(math.prod(int(f.shape[0]) for f in block) for block in out)
    shape = getattr(out, "shape", None)
    return int(shape[-1]) if shape is not None and len(shape) >= 2 else None


def _block_diag_kron(blocks: list[list[torch.Tensor]]) -> torch.Tensor:
    """Dense block diagonal of ``[[A, B], [C], ...]`` blocks (``A ⊗ B`` or ``C``)."""
    dense = [torch.kron(*b) if len(b) == 2 else b[0] for b in blocks]
    return torch.block_diag(*dense)


def to_common_form(out: Any, problem: Problem) -> torch.Tensor:
    """Bring an entry's output to a tensor comparable across libraries.

    Args:
        out: What the entry's thunk returned.
        problem: The problem it ran on (for `P` and the parameter shapes).

    Returns:
        A float64 tensor: `(P,)` vector, `(P, k)` or `(P, P)` matrix, or `(B, P, C)`.

    Raises:
        TypeError: If the output has no known dense form.
    """
    P = problem.num_params
    if isinstance(out, tuple) and len(out) == 2 and torch.is_tensor(out[0]) and out[0].ndim == 0:
        out = out[1]  # (loss, result) of the curvature interfaces
    if (isinstance(out, tuple) and len(out) == 2 and torch.is_tensor(out[0])
            and out[0].ndim == 3):
        out = out[0]  # (Js, f) of jacobians
    if torch.is_tensor(out):
        return out.detach().double()
    if isinstance(out, (list, tuple)) and out and all(torch.is_tensor(t) for t in out):
        return torch.cat([t.detach().reshape(-1) for t in out]).double()
    if isinstance(out, list) and out and all(isinstance(b, list) for b in out):
        return _block_diag_kron([[t.detach().double() for t in b] for b in out])
    if hasattr(out, "to_matrix"):  # laplace.utils.Kron
        return out.to_matrix().detach().double()
    if hasattr(out, "to_dense"):  # linear_operator / curvop.Kron
        return out.to_dense().detach().double()
    if hasattr(out, "shape") and hasattr(out, "__matmul__") and P <= _MAX_DENSE:
        w = next(problem.model.parameters())
        return (out @ torch.eye(P, dtype=w.dtype, device=w.device)).detach().double()
    raise TypeError(f"no dense form for {type(out).__name__}")


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖value − reference‖ / ‖reference‖``, transposing `(B, C, P)` Jacobians if needed.

    Args:
        value: The entry's result in common form.
        reference: The reference result in common form.

    Returns:
        The relative Frobenius error (``inf`` if the shapes cannot be matched).
    """
    if value.shape != reference.shape and value.ndim == 3:
        value = value.transpose(1, 2)
    if value.shape != reference.shape:
        return float("inf")
    value, reference = value.cpu(), reference.cpu()
    scale = torch.linalg.norm(reference).clamp_min(torch.finfo(torch.float64).tiny)
    return float(torch.linalg.norm(value - reference) / scale)
