"""laplace-torch through curvop: fit, tune the prior by the marginal likelihood, predict.

An existing laplace-torch workflow switches to curvop with one argument,
``backend=CurvopGGN``. This example trains a small MLP on a 1-D regression problem, fits a
Laplace approximation over all weights with curvop's GGN, optimises the prior precision and the
observation noise by the log marginal likelihood, computes the GLM predictive, and checks every
number against a dense reference built from scratch with ``torch.func`` Jacobians.

Run with ``python docs/examples/laplace_marglik.py`` (a few seconds on a CPU).
"""

from __future__ import annotations

import math

import laplace
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvop.compat.laplace import CurvopGGN

torch.manual_seed(0)
DTYPE = torch.float64


def make_data(n: int = 64):
    """Noisy samples of ``sin`` on ``[-3, 3]``."""
    x = torch.linspace(-3, 3, n, dtype=DTYPE).unsqueeze(1)
    y = torch.sin(x) + 0.1 * torch.randn(n, 1, dtype=DTYPE)
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> None:
    """A rough MAP estimate (Adam on the mean squared error plus a little weight decay)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def tune_hyperparameters(la, steps: int = 100) -> None:
    """Maximise the log marginal likelihood over log prior precision and log noise."""
    log_prior = torch.zeros(1, dtype=DTYPE, requires_grad=True)
    log_sigma = torch.zeros(1, dtype=DTYPE, requires_grad=True)
    opt = torch.optim.Adam([log_prior, log_sigma], lr=1e-1)
    for _ in range(steps):
        opt.zero_grad()
        (-la.log_marginal_likelihood(log_prior.exp(), log_sigma.exp())).backward()
        opt.step()
    la.prior_precision = log_prior.detach().exp()
    la.sigma_noise = log_sigma.detach().exp()


def dense_reference(model: nn.Module, x, y, x_test, delta: float, sigma: float):
    """Log marginal likelihood and GLM predictive from dense Jacobians (no laplace, no curvop)."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    theta = torch.cat([p.flatten() for p in params.values()])

    def jac(inputs):
        def f(ps):
            return torch.func.functional_call(model, ps, (inputs,))

        J = torch.func.jacrev(f)(params)
        return torch.cat([J[k].flatten(2) for k in params], dim=2).squeeze(1)  # (n, P)

    with torch.no_grad():
        f, f_test = model(x), model(x_test)
    J, J_test = jac(x), jac(x_test)
    n, P = J.shape
    precision = J.T @ J / sigma**2 + delta * torch.eye(P, dtype=DTYPE)  # GGN / σ² + δ I
    log_lik = (-(f - y).square().sum() / (2 * sigma**2)
               - n * math.log(sigma * math.sqrt(2 * math.pi)))
    log_det_ratio = torch.logdet(precision) - P * math.log(delta)
    marglik = log_lik - 0.5 * (log_det_ratio + delta * theta @ theta)
    f_var = torch.einsum("np,pq,nq->n", J_test, torch.linalg.inv(precision), J_test)
    return marglik, f_test.squeeze(1), f_var


def main() -> None:
    """Fit, tune, predict and compare with the dense reference."""
    x, y = make_data()
    model = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                          nn.Linear(10, 1)).to(DTYPE)
    train(model, x, y)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)

    # the only change to a laplace-torch workflow: backend=CurvopGGN
    la = laplace.Laplace(model, "regression", subset_of_weights="all",
                         hessian_structure="full", backend=CurvopGGN)
    la.fit(loader)
    tune_hyperparameters(la)
    delta, sigma = float(la.prior_precision), float(la.sigma_noise)

    x_test = torch.linspace(-4, 4, 9, dtype=DTYPE).unsqueeze(1)
    f_mu, f_var = la(x_test, pred_type="glm")
    pred_std = (f_var.squeeze() + sigma**2).sqrt()
    marglik = la.log_marginal_likelihood().detach()
    print(f"prior precision {delta:.4f}, noise std {sigma:.4f}, "
          f"log marginal likelihood {float(marglik):.4f}")
    for xi, mi, si in zip(x_test.squeeze(1), f_mu.squeeze(1), pred_std):
        print(f"  x = {float(xi):+.1f}: {float(mi):+.3f} ± {float(si):.3f}")

    ref_marglik, ref_mu, ref_var = dense_reference(model, x, y, x_test, delta, sigma)
    torch.testing.assert_close(marglik, ref_marglik, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(f_mu.squeeze(1), ref_mu, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(f_var.flatten(), ref_var, rtol=1e-6, atol=1e-10)
    # the predictive widens away from the data in [-3, 3]
    assert pred_std[0] > pred_std[4] and pred_std[-1] > pred_std[4]
    print("matches the dense reference")


if __name__ == "__main__":
    main()
