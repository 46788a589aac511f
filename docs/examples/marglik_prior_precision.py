r"""Laplace marginal likelihood over the prior precision.

With a Gaussian prior :math:`\mathcal N(0, \delta^{-1} I)` on the ``P`` weights and the GGN
``H`` as curvature at the trained weights :math:`\theta`, the Laplace approximation of the log
marginal likelihood is, up to a constant,

.. math::
    \log Z(\delta) \approx -\ell(\theta) - \tfrac{\delta}{2} \lVert\theta\rVert^2
    + \tfrac{P}{2} \log \delta - \tfrac12 \log\lvert H + \delta I\rvert .

Only :math:`\log\lvert H + \delta I\rvert` is expensive, and it has to be evaluated on a whole
grid of :math:`\delta`. This script gets it three ways for a small regression network: from one
dense eigendecomposition of :meth:`~curvop.curvature.CurvatureInterface.full` (checked against
``torch.logdet``), from the top eigenpairs of
:meth:`~curvop.curvature.CurvatureInterface.eig_lowrank` (checked against linear_operator's
exact log-determinant of :func:`curvop.linalg.low_rank_operator` plus :math:`\delta I`), and
from KFAC's exact damped log-determinant (``Kron.damped(δ).logdet()``).

A low-rank curvature drops the small eigenvalues: its log-determinant is a lower bound, so it
overestimates :math:`\log Z` and prefers a smaller :math:`\delta` (the dropped directions see
only the prior); a few more eigenpairs close the gap, since this GGN's spectrum decays fast.
KFAC overestimates this network's curvature (compare the diagonal example), pays a larger
Occam penalty and picks a larger :math:`\delta`.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

import curvop
from curvop.linalg import low_rank_operator

OUT = Path(os.environ.get("CURVOP_EXAMPLES_OUT",
                          Path(__file__).resolve().parents[1] / "_static" / "examples"))


def main() -> None:
    """Fit, compute log|H + δI| three ways, assert the exact paths agree, plot log Z(δ)."""
    torch.manual_seed(0)
    x = torch.linspace(-3, 3, 80, dtype=torch.float64).unsqueeze(1)
    y = torch.sin(2 * x) + 0.1 * torch.randn_like(x)
    model = torch.nn.Sequential(torch.nn.Linear(1, 24), torch.nn.Tanh(),
                                torch.nn.Linear(24, 24), torch.nn.Tanh(),
                                torch.nn.Linear(24, 1)).double()
    for _ in range(500):  # plain full-batch gradient descent on the mean squared error
        loss = torch.nn.functional.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= 0.1 * g
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    P = theta.numel()

    # dense GGN, checked against JᵀJ from torch.func (Λ = I for unit-noise regression)
    loss, H = curvop.TorchGGN(model, "regression").full(x, y)
    params = {k: v.detach() for k, v in model.named_parameters()}
    J = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    J = torch.cat([j.flatten(2) for j in J.values()], dim=2).flatten(0, 1)     # (N, P)
    assert torch.allclose(H, J.T @ J, rtol=1e-9, atol=1e-10)
    assert torch.isclose(loss, 0.5 * ((model(x) - y) ** 2).sum())

    deltas = torch.logspace(-3, 1, 41, dtype=torch.float64)
    one = int((deltas - 1).abs().argmin())  # δ = 1, where the paths are cross-checked
    lam = torch.linalg.eigvalsh(H).clamp_min(0)
    logdet = {"dense (eigvalsh of full)": torch.log(lam + deltas[:, None]).sum(1)}
    for d in (1e-2, 1.0, 1e2):
        exact = torch.logdet(H + d * torch.eye(P, dtype=H.dtype))
        assert torch.isclose(torch.log(lam + d).sum(), exact, rtol=1e-8)

    # top eigenpairs, matrix-free over a loader; log|UΛUᵀ + δI| = Σ log(λ_k + δ) + (P - k) log δ
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    for k in (2, 5, 40):
        U, lam_k, _ = curvop.TorchGGN(model, "regression", low_rank=k).eig_lowrank(loader)
        assert torch.allclose(lam_k, lam.flip(0)[: len(lam_k)], rtol=1e-6)
        lr = torch.log(lam_k + deltas[:, None]).sum(1) + (P - len(lam_k)) * torch.log(deltas)
        op = low_rank_operator(U, lam_k).add_diagonal(deltas[one])
        assert torch.isclose(op.logdet(), lr[one], rtol=1e-8)
        assert bool((lr <= logdet["dense (eigvalsh of full)"] + 1e-8).all())  # a lower bound
        logdet[f"low rank, {len(lam_k)} eigenpairs (eig_lowrank)"] = lr

    # KFAC: exact log-determinant of the damped Kronecker factors, never densified
    K = curvop.TorchGGN(model, "regression").kron(x, y, N=x.shape[0])[1]
    kfac = torch.stack([K.damped(float(d)).logdet() for d in deltas])
    eye = torch.eye(P, dtype=H.dtype)
    assert torch.isclose(kfac[one], torch.logdet(K.to_dense() + deltas[one] * eye), rtol=1e-8)
    logdet["KFAC (Kron.damped(δ).logdet())"] = kfac

    fig, ax = plt.subplots(figsize=(7, 4.2))
    tops: list[float] = []
    for (label, ld), style in zip(logdet.items(), ["-", ":", "--", "-.", (0, (5, 1, 1, 1))]):
        log_z = (-loss - 0.5 * deltas * theta.square().sum()
                 + 0.5 * P * torch.log(deltas) - 0.5 * ld)
        best = int(log_z.argmax())
        line, = ax.semilogx(deltas.numpy(), log_z.numpy(), ls=style,
                            lw=4 if style == "-" else 2, label=label)
        ax.plot(float(deltas[best]), float(log_z[best]), "o", color=line.get_color())
        tops.append(float(log_z[best]))
    ax.set(xlabel="prior precision δ", ylabel="log Z(δ)  (up to a constant)",
           ylim=(tops[0] - 120, max(tops) + 10),
           title=f"Laplace marginal likelihood of a 1-24-24-1 MLP "
                 f"(P = {P}, N = {x.shape[0]})")
    ax.legend(fontsize=9, loc="lower left")
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "marglik_prior_precision.png", dpi=110)
    print(f"wrote {OUT / 'marglik_prior_precision.png'}")


if __name__ == "__main__":
    main()
