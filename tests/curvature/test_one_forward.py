"""The native diag and kron take the model's outputs from their tapped forward pass.

One forward instead of a forward without graph followed by the tapped one; the result, the loss,
the MC draws and the error checks must not change. Truth: the dense float64 references.
"""

import pytest
import torch
from torch import nn

import curvop
from curvop.errors import InputError

import reference as ref
from cases import Counted, register

DT = torch.float64


class Scaled(nn.Module):
    """A parameter without a layer tap: the per-sample route."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, 2.0], dtype=DT))

    def forward(self, x):
        return x * self.scale


def _model(kind):
    torch.manual_seed(0)
    layers = {
        "mlp": [nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)],
        "layernorm": [nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)],
        "untapped": [nn.Linear(5, 3), nn.Tanh(), Scaled()],
    }[kind]
    return register(Counted(nn.Sequential(*layers).to(DT)))


def _data(likelihood, n=7):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, dtype=DT, generator=g)
    y = (torch.randint(0, 3, (n,), generator=g) if likelihood == "classification"
         else torch.randn(n, 3, dtype=DT, generator=g))
    return x, y


def _calls(model, fn):
    before = len(model.counter)
    out = fn()
    return out, len(model.counter) - before


@pytest.mark.parametrize("kind", ["mlp", "layernorm", "untapped"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("cls, reference", [(curvop.TorchGGN, ref.ggn), (curvop.TorchEF, ref.ef)])
def test_diag_runs_one_forward_and_is_exact(kind, likelihood, cls, reference):
    model = _model(kind)
    x, y = _data(likelihood)
    (loss, h), n = _calls(model, lambda: cls(model, likelihood).diag(x, y))
    # taps with their one-time check (the probe reuses the graph): one forward; the per-sample
    # route of LayerNorm and of untapped parameters runs its own (vmapped) forward in addition
    assert n == (1 if kind == "mlp" else 2)
    torch.testing.assert_close(h, torch.diagonal(reference(model, x, y, likelihood)),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, ref.loss(model, x, y, likelihood), rtol=1e-12, atol=0)


def test_mc_diag_draws_the_same_labels_as_before():
    """The sampled S now comes after the tapped forward; the forward draws nothing, so the
    generator gives the same labels as when S came first."""
    model = _model("mlp")
    x, y = _data("classification")
    h1 = curvop.TorchGGN(model, "classification", stochastic=True, num_samples=3,
                         generator=torch.Generator().manual_seed(5)).diag(x, y)[1]
    f = model(x).detach()
    S = curvop.Likelihood("classification").sampled_sqrt_output_hessian(
        f, 3, torch.Generator().manual_seed(5))
    Js = ref.jacobians(model, x)[0]  # (B, C, P)
    expected = torch.einsum("bcp,bck->bkp", Js, S).square().sum((0, 1))
    torch.testing.assert_close(h1, expected, rtol=1e-10, atol=1e-12)


def test_diag_checks_targets_after_the_tapped_forward():
    model = _model("mlp")
    x, y = _data("classification")
    with pytest.raises(InputError, match="`y`"):
        curvop.TorchGGN(model, "classification").diag(x, y + 3)
    with pytest.raises(InputError, match="`y`"):
        curvop.TorchEF(model, "classification").diag(x, y[:3])
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_token_outputs_and_last_layer_diag():
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    model = register(Counted(inner))
    x = torch.randint(0, 7, (4, 6))
    y = torch.randint(0, 3, (4, 6))
    y[1, 3:] = -100
    for kwargs in ({}, {"last_layer": True}):
        loss, h = curvop.TorchGGN(model, "classification", **kwargs).diag(x, y)
        dense = curvop.TorchGGN(model, "classification", **kwargs).full(x, y)
        torch.testing.assert_close(h, torch.diagonal(dense[1]), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(loss, dense[0], rtol=1e-12, atol=0)
