r"""The eigenvalue spectrum of a GGN.

A small classifier is trained on three Gaussian blobs; its generalised Gauss-Newton matrix over
the 64 training points is computed densely with :meth:`~curvop.curvature.CurvatureInterface.full`
and checked against a brute-force :math:`\sum_n J_n^\top \Lambda_n J_n` from ``torch.func``.
The full spectrum (``torch.linalg.eigvalsh``) is then compared with the top eigenvalues that
:meth:`~curvop.curvature.CurvatureInterface.eig_lowrank` finds matrix-free over a data loader.

The GGN of ``N`` points and ``C`` classes has rank at most ``N (C - 1)``, here 128 of 403
parameters: everything to the right of the dashed line is zero up to round-off. Most of the
curvature sits in a handful of directions, which is why a rank-20 approximation captures it.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

import curvop

OUT = Path(os.environ.get("CURVOP_EXAMPLES_OUT",
                          Path(__file__).resolve().parents[1] / "_static" / "examples"))


def blobs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 4-D: ``x`` `(n, 4)`, labels ``y`` `(n,)`."""
    y = torch.randint(0, 3, (n,), generator=generator)
    centres = 2.0 * torch.randn(3, 4, generator=generator, dtype=torch.float64)
    return centres[y] + torch.randn(n, 4, generator=generator, dtype=torch.float64), y


def brute_force_ggn(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``sum_n J_nᵀ (diag(p_n) - p_n p_nᵀ) J_n`` from full Jacobians, `(P, P)`."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (x,)))(params)       # (N, C, *shape) each
    J = torch.cat([j.flatten(2) for j in J.values()], dim=2)             # (N, C, P)
    p = torch.softmax(model(x).detach(), dim=1)
    lam = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)          # (N, C, C)
    return torch.einsum("ncp,ncd,ndq->pq", J, lam, J)


def main() -> None:
    """Train, compute the spectrum two ways, assert they agree, plot."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = blobs(64, gen)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3)).double()
    for _ in range(300):  # plain full-batch gradient descent on the mean cross-entropy
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= 0.5 * g

    ggn = curvop.TorchGGN(model, "classification", low_rank=20)
    loss, H = ggn.full(x, y)
    reference = brute_force_ggn(model, x)
    assert torch.allclose(H, reference, rtol=1e-8, atol=1e-10), "full() differs from JᵀΛJ"
    summed = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
    assert torch.isclose(loss, summed)

    dense = torch.linalg.eigvalsh(H).flip(0).clamp_min(1e-16)     # descending
    loader = DataLoader(TensorDataset(x, y), batch_size=16)       # 4 batches, fixed order
    U, lam, loss_lr = ggn.eig_lowrank(loader)
    assert torch.allclose(lam, dense[: len(lam)], rtol=1e-6), "eig_lowrank misses the top"
    assert torch.allclose(U.T @ H @ U, torch.diag(lam), atol=1e-6 * float(lam[0]))
    assert torch.isclose(loss_lr, loss)

    P, rank_bound = H.shape[0], x.shape[0] * 2
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.semilogy(range(1, P + 1), dense.numpy(), lw=1.5, label="dense eigvalsh(full(x, y))")
    ax.semilogy(range(1, len(lam) + 1), lam.numpy(), "o", mfc="none", ms=6,
                label=f"eig_lowrank, top {len(lam)} (matrix-free, 4 batches)")
    ax.axvline(rank_bound, ls="--", c="grey", lw=1)
    ax.text(rank_bound + 4, float(dense[0]) / 10, "rank bound N (C-1)", color="grey")
    ax.set(xlabel=r"index $i$", ylabel=r"eigenvalue $\lambda_i$",
           ylim=(1e-12, 2 * float(dense[0])),
           title=f"GGN spectrum of a 4-16-16-3 MLP (P = {P}, N = {x.shape[0]})")
    ax.legend()
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "ggn_spectrum.png", dpi=110)
    print(f"top eigenvalues {lam[:5].tolist()}; wrote {OUT / 'ggn_spectrum.png'}")


if __name__ == "__main__":
    main()
