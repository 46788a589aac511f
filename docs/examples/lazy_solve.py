r"""Solving with a matrix-free GGN: linear_operator and scipy.

:meth:`~curvop.curvature.CurvatureInterface.full_operator` returns the GGN of a batch as a
``linear_operator.LinearOperator`` whose products run a Jacobian-vector and a vector-Jacobian
product through the network; no `(P, P)` matrix exists. This script checks its products against
the dense :meth:`~curvop.curvature.CurvatureInterface.full`, solves the damped system
:math:`(G + \delta I) x = g` (a natural-gradient or Newton step, ``g`` the gradient) with
linear_operator's ``solve`` and with ``scipy.sparse.linalg.cg`` through
:func:`curvop.to_scipy`, and compares both with ``torch.linalg.solve`` on the dense matrix.

The picture shows what the damping does to conjugate gradients: the smaller :math:`\delta`,
the worse the conditioning of :math:`G + \delta I` and the more products CG needs.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import scipy.sparse.linalg
import torch

import curvop

OUT = Path(os.environ.get("CURVOP_EXAMPLES_OUT",
                          Path(__file__).resolve().parents[1] / "_static" / "examples"))


def main() -> None:
    """Check the operator's products and solves against dense linear algebra, plot CG."""
    torch.manual_seed(0)
    x = torch.randn(96, 10, dtype=torch.float64)
    y = torch.randint(0, 4, (96,))
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(),
                                torch.nn.Linear(20, 4)).double()
    ggn = curvop.TorchGGN(model, "classification")
    _, G = ggn.full(x, y)                       # dense, for reference only
    loss, op = ggn.full_operator(x, y)          # lazy: nothing (P, P) is formed
    P = op.shape[0]

    v = torch.randn(P, 3, dtype=torch.float64)
    assert torch.allclose(op @ v, G @ v, rtol=1e-10, atol=1e-10)
    assert torch.allclose(op.diagonal(), torch.diagonal(G), rtol=1e-10, atol=1e-12)

    summed = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
    g = torch.cat([p.flatten() for p in torch.autograd.grad(summed, model.parameters())])

    fig, ax = plt.subplots(figsize=(7, 4))
    steps: dict[float, int] = {}
    for delta in (10.0, 1.0, 0.1, 0.01):
        exact = torch.linalg.solve(G + delta * torch.eye(P, dtype=G.dtype), g)
        damped = op.add_diagonal(torch.tensor(delta, dtype=G.dtype))   # still lazy
        assert torch.allclose(damped.solve(g.unsqueeze(1)).squeeze(1), exact, rtol=1e-5,
                              atol=1e-8 * float(exact.abs().max()))

        A, b = curvop.to_scipy(damped), g.numpy()
        iterates: list[np.ndarray] = []

        def keep(xk: np.ndarray, out: list = iterates) -> None:
            out.append(xk.copy())    # scipy updates its iterate in place: keep copies

        sol, info = scipy.sparse.linalg.cg(A, b, rtol=1e-10, maxiter=10 * P, callback=keep)
        residuals = [np.linalg.norm(A @ xk - b) / np.linalg.norm(b) for xk in iterates]
        assert info == 0 and np.allclose(sol, exact.numpy(), rtol=1e-6, atol=1e-9)
        # the curve falls from the first step's residual to the tolerance
        assert residuals[0] > 1e-3 > 1e-9 > residuals[-1], (residuals[0], residuals[-1])
        steps[delta] = len(residuals)
        ax.semilogy(range(1, len(residuals) + 1), residuals, lw=2, label=f"δ = {delta:g}")
    # smaller damping, worse conditioning, more products
    assert steps[10.0] < steps[1.0] < steps[0.1] < steps[0.01], steps

    ax.set(xlabel="CG iteration (one product with the lazy GGN each)",
           ylabel="relative residual ‖(G + δI)x − g‖ / ‖g‖",
           title=f"scipy CG on curvop.to_scipy(GGN + δI), P = {P}")
    ax.legend()
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "lazy_solve.png", dpi=110)
    print(f"loss {float(loss):.4g}; wrote {OUT / 'lazy_solve.png'}")


if __name__ == "__main__":
    main()
