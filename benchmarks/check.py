"""Cross-check of an entry's result against the task's curvop reference (``--check``).

Timing says nothing about correctness, so with ``--check`` every entry's output is brought
to a common form (a vector for diagonals and products, a matrix for dense and Kronecker
results, `(B, P, C)` for Jacobians) and compared with the output of the curvop reference
entry of its task on a fresh copy of the problem. Monte-Carlo tasks are not compared. Meant
for ``--quick`` problems, where dense forms are small.

The eigen tasks (:data:`EIG_TASKS`) are always checked, on every problem: the returned pairs
against the curvature in float64 (:func:`eig_accuracy`), see there.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.problems import Problem, make_problem

__all__ = ["CHECKED_TASKS", "COVERAGE_TASKS", "EIG_TASKS", "covered_params", "eig_accuracy",
           "eig_pairs", "eig_reference", "relative_error", "to_common_form"]

CHECKED_TASKS = frozenset({
    "diag_ggn", "diag_ef", "jacobians", "full_ggn", "full_ef", "full_hessian", "ggn_product",
    "matmat16", "hvp", "ef_product", "kfac_exact", "laplace_full", "laplace_diag",
    "laplace_kron",
})  # fmt: skip
"""Deterministic tasks whose results are compared."""

EIG_TASKS: dict[str, str] = {"eig_top10": "TorchGGN", "eig_top10_hessian": "TorchHessian"}
"""Eigen task -> the curvop class whose float64 operator is the truth for it."""

EIG_REFERENCE_TOL = 1e-12
"""ARPACK ``tol`` of the float64 reference eigenvalues."""

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
    if hasattr(out, "posterior_precision") and hasattr(out, "H"):  # a fitted laplace Laplace
        out = out.posterior_precision
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


# --------------------------------------------------------------------------- eigenpairs
def eig_pairs(out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U (P, k), lam (k,))`` in float64 on the CPU, ``lam`` descending, from an eig entry.

    Args:
        out: ``(U, lam[, loss])`` of curvop (torch) or ``(lam, U)`` of scipy's ``eigsh``.

    Returns:
        The eigenvectors (columns) and eigenvalues.
    """
    if isinstance(out, tuple) and isinstance(out[0], np.ndarray):
        lam, U = (torch.as_tensor(np.asarray(a, dtype=np.float64)) for a in out[:2])
    else:
        U, lam = (torch.as_tensor(a).detach().double().cpu() for a in out[:2])
    order = torch.argsort(lam, descending=True)
    return U[:, order], lam[order]


def _operator64(name: str, quick: bool, task: str, device: torch.device | str):
    """The task's curvature of the problem in float64 (same parameters and data, upcast)."""
    import curvop

    prob = make_problem(name, quick=quick, device=device, dtype=torch.float64)
    iface = getattr(curvop, EIG_TASKS[task])(prob.model, prob.likelihood)
    return prob, iface.full_operator(prob.x, prob.y)[1]


def _fingerprint(prob: Problem) -> str:
    h = hashlib.sha1()
    for t in [*prob.model.parameters(), prob.x, prob.y]:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def eig_reference(name: str, quick: bool, task: str, k: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The top ``k`` eigenvalues of the task's float64 curvature (descending), cached on disk.

    ARPACK ``eigsh`` (``which='LA'``, ``tol=EIG_REFERENCE_TOL``, ``ncv=4k``) on curvop's
    float64 operator products; cached in the temporary folder under a hash of the
    parameters and data, so the entries of a run (separate processes) compute it once.

    Args:
        name: Problem name.
        quick: Tiny variant.
        task: A key of :data:`EIG_TASKS`.
        k: Number of eigenvalues.
        device: Where the products run.

    Returns:
        `(k,)` float64 on the CPU.
    """
    from scipy.sparse.linalg import eigsh

    from curvop.interop.scipy import to_scipy

    prob, op = _operator64(name, quick, task, device)
    folder = Path(tempfile.gettempdir()) / "curvop_bench"
    path = folder / f"eigref_{name}_{int(quick)}_{task}_{k}_{_fingerprint(prob)}.pt"
    if path.exists():
        return torch.load(path)
    P = prob.num_params
    if k >= P - 1:
        lam = torch.linalg.eigvalsh(op.to_dense()).flip(0)[:k].cpu()
    else:
        v0 = np.random.default_rng(1).standard_normal(P)
        lam = eigsh(to_scipy(op), k=k, which="LA", tol=EIG_REFERENCE_TOL,
                    ncv=min(P, 4 * k), v0=v0, return_eigenvectors=False)
        lam = torch.as_tensor(np.sort(lam)[::-1].copy())
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(lam, path)
    return lam


def eig_accuracy(out: Any, name: str, quick: bool, task: str, k: int,
                 device: torch.device | str = "cpu") -> dict[str, Any]:
    """Accuracy of an eig entry's pairs against the task's curvature in float64.

    Args:
        out: What the entry returned (see :func:`eig_pairs`).
        name: Problem name.
        quick: Tiny variant.
        task: A key of :data:`EIG_TASKS`.
        k: Number of eigenpairs asked for.
        device: Where the float64 products run.

    Returns:
        ``eig_k`` (pairs returned), ``eig_rel_err`` (largest ``|λ_i − λ_i^ref| / |λ_i^ref|``
        against :func:`eig_reference`), ``eig_residual`` (largest ``‖A u_i − λ_i u_i‖ / |λ_i|``
        with ``A`` in float64 and ``u_i`` normalised), ``eig_orth`` (largest entry of
        ``|UᵀU − I|``).
    """
    U, lam = eig_pairs(out)
    n = int(lam.numel())
    if n == 0:
        return {"eig_k": 0}
    ref = eig_reference(name, quick, task, k, device)[:n]
    prob, op = _operator64(name, quick, task, device)
    Un = U / U.norm(dim=0)
    AU = (op @ Un.to(op.device)).cpu()
    resid = (AU - Un * lam).norm(dim=0) / lam.abs().clamp_min(1e-300)
    orth = (U.T @ U - torch.eye(n, dtype=U.dtype)).abs().max()
    return {"eig_k": n, "eig_rel_err": float(((lam - ref).abs() / ref.abs()).max()),
            "eig_residual": float(resid.max()), "eig_orth": float(orth)}
