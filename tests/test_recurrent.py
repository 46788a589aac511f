"""Modules without forward-mode AD or vmap support (nn.LSTM, nn.GRU on CPU) work everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvop

import reference as ref
from cases import register


class RecurrentNet(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        out, _ = self.rnn(x.reshape(x.shape[0], 3, 4))
        return self.head(out[:, -1])


KINDS = {"ggn": curvop.TorchGGN, "ef": curvop.TorchEF, "hessian": curvop.TorchHessian}


def _full_diag_and_products_match_dense(kind, model, x, y, likelihood):
    """full, diag and products with one vector and three of the operator: the dense reference."""
    iface = KINDS[kind](model, likelihood)
    H = ref.CURVATURES[kind](model, x, y, likelihood)
    tol = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(iface.full(x, y)[1], H, **tol)
    torch.testing.assert_close(iface.diag(x, y)[1], H.diagonal(), **tol)
    _, op = iface.full_operator(x, y)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, H @ V, **tol)
    torch.testing.assert_close(op @ V[:, 0], H @ V[:, 0], **tol)
    return iface, tol


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_recurrent_every_method(kind, cell, likelihood):
    torch.manual_seed(0)
    model = register(RecurrentNet(cell).double().eval())
    x = torch.randn(4, 12, dtype=torch.float64)
    y = (torch.randint(0, 2, (4,)) if likelihood == "classification"
         else torch.randn(4, 2, dtype=torch.float64))
    iface, tol = _full_diag_and_products_match_dense(kind, model, x, y, likelihood)
    J, f = ref.jacobians(model, x)
    torch.testing.assert_close(iface.jacobians(x)[0], J.transpose(1, 2), **tol)
    torch.testing.assert_close(iface.gradients(x, y)[1], ref.gradients(model, x, y, likelihood),
                               **tol)


class _ReverseOnlyTanh(torch.autograd.Function):
    """tanh with a differentiable backward but no ``jvp``: no forward-mode AD, as cuDNN-off
    LSTM cells on CUDA (``_thnn_fused_lstm_cell``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)  # differentiable: double backward works


class ReverseOnlyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(_ReverseOnlyTanh.apply(self.fc1(x)))


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_layer_without_forward_mode_ad_every_method(kind, likelihood):
    torch.manual_seed(0)
    model = register(ReverseOnlyNet().double().eval())
    x = torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError):  # the premise: no forward-mode AD
        torch.func.jvp(model, (x,), (x,))
    y = (torch.randint(0, 3, (6,)) if likelihood == "classification"
         else torch.randn(6, 3, dtype=torch.float64))
    iface, _ = _full_diag_and_products_match_dense(kind, model, x, y, likelihood)
    if kind != "hessian":
        K = iface.kron(x, y, 6, fallback="diag")
        assert K is not None
