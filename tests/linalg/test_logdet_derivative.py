"""d/dδ log det(A + δI) = tr (A + δI)⁻¹: every route, and autograd through ``logdet``."""

from __future__ import annotations

import pytest
import torch
from linear_operator.operators import DiagLinearOperator

import curvop
from curvop.errors import InputError, NotSupportedError
from curvop.linalg import factorize, low_rank_operator

import reference as ref
from linalg_problems import tanh_mlp

F64 = torch.float64
GRID = torch.tensor([1e-2, 0.3, 2.0, 9.0], dtype=F64)


def _trace_inv(H: torch.Tensor, deltas) -> torch.Tensor:
    eye = torch.eye(H.shape[0], dtype=F64)
    return torch.stack([torch.linalg.inv(H + float(d) * eye).diagonal().sum() for d in deltas])


def _psd(n: int, rank: int, seed: int) -> torch.Tensor:
    X = torch.randn(n, rank, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return X @ X.T / rank


def _ggn_problem():
    model, X, Y = tanh_mlp(5, 8, 6)
    _, op = curvop.TorchGGN(model, "classification").full_operator(X, Y)
    return op, ref.ggn(model, X, Y, "classification")


@pytest.mark.parametrize("dual", ["auto", "band", "eigh", "cholesky"])
def test_dual_route_derivative_is_the_trace_of_the_inverse(dual):
    op, H = _ggn_problem()
    fac = factorize(op, dual=dual)
    assert fac.route == "dual"  # R = 6 * 2 = 12 < P = 75
    if dual == "auto":
        fac.logdet(GRID)  # the band form first: the spectrum then comes from it
        assert fac._impl.fact._band is not None
    torch.testing.assert_close(fac.logdet_derivative(GRID), _trace_inv(H, GRID), rtol=1e-9,
                               atol=0)
    torch.testing.assert_close(fac.logdet_derivative(0.3), _trace_inv(H, [0.3])[0], rtol=1e-9,
                               atol=0)
    # central differences of logdet agree
    h = 1e-5
    fd = (fac.logdet(0.3 + h) - fac.logdet(0.3 - h)) / (2 * h)
    torch.testing.assert_close(fac.logdet_derivative(0.3), fd, rtol=1e-6, atol=0)
    with pytest.raises(InputError, match="singular"):
        fac.logdet_derivative(0.0)  # P - R zero eigenvalues


def test_exact_structured_routes():
    A, B, C = _psd(4, 6, 1), _psd(3, 1, 2), _psd(2, 4, 3)
    K = curvop.Kron([[A, B], [C]])
    cases = [
        (K, torch.block_diag(torch.kron(A, B), C)),
        (DiagLinearOperator(torch.linspace(0.0, 3.0, 7, dtype=F64)),
         torch.diag(torch.linspace(0.0, 3.0, 7, dtype=F64))),
        (_psd(9, 12, 4), _psd(9, 12, 4)),
    ]
    U, _ = torch.linalg.qr(torch.randn(20, 3, dtype=F64, generator=torch.Generator()
                                       .manual_seed(5)))
    lam = torch.tensor([4.0, 1.0, 0.2], dtype=F64)
    cases.append((low_rank_operator(U, lam), U @ torch.diag(lam) @ U.T))
    for op, H in cases:
        fac = factorize(op)
        assert fac.exact
        torch.testing.assert_close(fac.logdet_derivative(GRID), _trace_inv(H, GRID),
                                   rtol=1e-10, atol=0)


def test_logdet_is_differentiable_in_a_delta_tensor():
    op, H = _ggn_problem()
    fac = factorize(op)
    # one δ: the gradient of the log marginal likelihood's log-determinant term
    log_prec = torch.tensor(0.2, dtype=F64, requires_grad=True)
    value = fac.logdet(log_prec.exp())
    assert value.requires_grad
    torch.testing.assert_close(value.detach(), fac.logdet(float(log_prec.detach().exp())))
    (g,) = torch.autograd.grad(value, log_prec)
    expected = _trace_inv(H, [float(log_prec.detach().exp())])[0] * log_prec.exp().detach()
    torch.testing.assert_close(g, expected, rtol=1e-9, atol=0)
    # a grid, float32 δ: gradients per entry, in δ's dtype
    deltas = GRID.float().requires_grad_()
    values = fac.logdet(deltas)
    assert values.shape == (4,)
    values.sum().backward()
    assert deltas.grad.dtype == torch.float32
    torch.testing.assert_close(deltas.grad.double(), _trace_inv(H, GRID), rtol=1e-6, atol=0)
    # a few steps of gradient descent on a toy objective move δ where its derivative is zero:
    # log det(H + δI) - c δ is stationary at tr (H + δI)⁻¹ = c
    target = float(_trace_inv(H, [1.0])[0])
    x = torch.tensor(0.0, dtype=F64, requires_grad=True)  # δ = exp(x)
    opt = torch.optim.LBFGS([x], max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -(fac.logdet(x.exp()) - target * x.exp())
        loss.backward()
        return loss

    opt.step(closure)
    assert abs(float(x.detach().exp()) - 1.0) < 1e-4
    # first derivatives only: a second one raises instead of leaving a term out
    d = torch.tensor(0.4, dtype=F64, requires_grad=True)
    (g1,) = torch.autograd.grad(fac.logdet(d) ** 2, d, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g1.backward()


def test_iterative_estimate_and_operator_route():
    model, X, Y = tanh_mlp(4, 6, 20)
    _, op = curvop.TorchHessian(model, "classification").full_operator(X, Y)
    H = ref.hessian(model, X, Y, "classification")
    delta = float(-torch.linalg.eigvalsh(H)[0]) + 0.5
    fac = factorize(op, num_probes=200, max_steps=60, quad_tol=1e-10)
    assert fac.route == "iterative"
    est, exact = fac.logdet_derivative([delta, delta + 1.0]), _trace_inv(H, [delta, delta + 1])
    torch.testing.assert_close(est, exact, rtol=0.05, atol=0)  # Monte Carlo over 200 probes
    with pytest.raises(InputError, match="positive definite"):
        fac.logdet_derivative(0.0)
    A, B = _psd(3, 5, 6), _psd(2, 4, 7)
    K = curvop.Kron([[A, B]]).add_diagonal(torch.linspace(0.1, 1.0, 6, dtype=F64))
    with pytest.raises(NotSupportedError, match="method='iterative'"):
        factorize(K).logdet_derivative(0.5)
    with pytest.raises(NotSupportedError, match="no derivative"):
        factorize(K).logdet(torch.tensor(0.5, dtype=F64, requires_grad=True))
