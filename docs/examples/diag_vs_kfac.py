r"""Exact diagonal versus the KFAC diagonal.

Two cheap stand-ins for a GGN too large to store are its exact diagonal
(:meth:`~curvop.curvature.CurvatureInterface.diag`, computed in closed form for Linear layers)
and the diagonal of its Kronecker-factored approximation
(:meth:`~curvop.curvature.CurvatureInterface.kron`, a :class:`~curvop.operators.Kron` whose
``diagonal()`` never forms a block). This script checks the first against the diagonal of a
brute-force :math:`\sum_n J_n^\top \Lambda_n J_n`, checks that KFAC is exact for a single data
point, and then plots the two diagonals against each other for a trained network and a batch of
128 points.

Points on the dashed line are entries KFAC gets right. Bias blocks are exact in KFAC. A weight
block, a sum over data points of Kronecker products, is replaced by one Kronecker product of
sums; once training has made the output Hessians differ between points, that factorisation
misses, here mostly upwards and most for the first layer.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch.func import functional_call, jacrev

import curvop

OUT = Path(os.environ.get("CURVOP_EXAMPLES_OUT",
                          Path(__file__).resolve().parents[1] / "_static" / "examples"))


def brute_force_ggn(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``sum_n J_nᵀ (diag(p_n) - p_n p_nᵀ) J_n`` from full Jacobians, `(P, P)`."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    J = torch.cat([j.flatten(2) for j in J.values()], dim=2)             # (N, C, P)
    p = torch.softmax(model(x).detach(), dim=1)
    lam = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)          # (N, C, C)
    return torch.einsum("ncp,ncd,ndq->pq", J, lam, J)


def kfac(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> curvop.Kron:
    """KFAC of the GGN over ``(x, y)`` as the whole data set (``N = len(x)``)."""
    return curvop.TorchGGN(model, "classification").kron(x, y, N=x.shape[0])[1]


def main() -> None:
    """Compare the exact and KFAC diagonals with brute force, then plot them."""
    torch.manual_seed(0)
    x = torch.randn(128, 8, dtype=torch.float64)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:].sum(1) > 0).long()   # 3 classes
    model = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.Tanh(),
                                torch.nn.Linear(24, 24), torch.nn.Tanh(),
                                torch.nn.Linear(24, 3)).double()
    for _ in range(300):  # plain full-batch gradient descent on the mean cross-entropy
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= 0.5 * g
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]

    # 1. the exact diagonal is the diagonal of JᵀΛJ
    ggn = curvop.TorchGGN(model, "classification")
    _, h = ggn.diag(x, y)
    H = brute_force_ggn(model, x)
    assert torch.allclose(h, torch.diagonal(H), rtol=1e-10, atol=1e-12)

    # 2. for one data point KFAC is the exact block diagonal (one block per parameter tensor)
    x1, y1 = x[:1], y[:1]
    K1 = kfac(model, x1, y1)
    H1 = brute_force_ggn(model, x1)
    starts = [0, *itertools.accumulate(sizes)]
    blocks = torch.block_diag(*[H1[a:b, a:b] for a, b in zip(starts, starts[1:])])
    assert torch.allclose(K1.to_dense(), blocks, atol=1e-10)

    # 3. for a batch KFAC is an approximation; compare the diagonals
    K = kfac(model, x, y)
    k = K.diagonal()
    for name, hs, ks in zip(names, torch.split(h, sizes), torch.split(k, sizes)):
        if name.endswith("bias"):  # a bias block is exact in KFAC: Σ_n J_nᵀ Λ_n J_n itself
            assert torch.allclose(ks, hs, rtol=1e-8), name

    fig, ax = plt.subplots(figsize=(6, 5.5))
    for name, hs, ks in zip(names, torch.split(h, sizes), torch.split(k, sizes)):
        rel = float((ks - hs).norm() / hs.norm())
        ax.loglog(hs.numpy(), ks.numpy(), ".", ms=4, alpha=0.7,
                  label=f"{name} ({hs.numel()}), rel. error {rel:.2f}")
    lo, hi = float(h.min()) / 2, float(h.max()) * 2
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel="exact GGN diagonal  (TorchGGN.diag)",
           ylabel="KFAC diagonal  (TorchGGN.kron(...).diagonal())",
           title="GGN diagonal of a trained 8-24-24-3 MLP, 128 points")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "diag_vs_kfac.png", dpi=110)
    print(f"trace exact {float(h.sum()):.4g}, KFAC {float(k.sum()):.4g}; "
          f"wrote {OUT / 'diag_vs_kfac.png'}")


if __name__ == "__main__":
    main()
