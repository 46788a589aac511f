"""``FunctionalModel``: the model as a function of its parameters, equal to torch's own call.

Tied weights, a module registered under two names, parametrizations and buffers each take the
values handed in (the user's tensors are never read for the live ones), gradients flow to the
handed-in tensors only, and the user's tensors are back in place afterwards, also when the
forward raises.
"""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from curvop._functional import FunctionalModel
from curvop.params import ParameterSelection

DT = torch.float64


class _Tied(nn.Module):
    """Encoder and decoder sharing one weight tensor (registered in two modules)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4, bias=False)
        self.mid = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.mid(self.enc(x))))


class _Symmetric(nn.Module):
    def forward(self, W):
        return (W + W.mT) / 2


def _shared():
    lin = nn.Linear(4, 4)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.BatchNorm1d(4).eval(), nn.Linear(4, 3))


def _parametrized():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    parametrize.register_parametrization(model[0], "weight", _Symmetric())
    return model


MODELS = {"tied": _Tied, "shared": _shared, "parametrized": _parametrized}


def _user_tensors(model):
    return {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("name", list(MODELS))
def test_equals_torch_functional_call_and_restores(name):
    torch.manual_seed(0)
    model = MODELS[name]().to(DT)
    x = torch.randn(5, 4, dtype=DT)
    own = _user_tensors(model)
    sel = ParameterSelection(model)
    fm = FunctionalModel(model, sel)
    theta = [(p.detach() + 0.1 * torch.randn_like(p)).requires_grad_() for p in sel.params]
    f = fm(theta, x)
    now = _user_tensors(model)
    assert now.keys() == own.keys() and all(now[n] is own[n] for n in own)

    # torch's call on a copy: it does not restore a module registered under two names
    twin = copy.deepcopy(model)
    values = {n: b for n, b in twin.named_buffers()}
    values.update(zip(sel.names, theta))
    expected = functional_call(twin, values, (x,))
    torch.testing.assert_close(f, expected, rtol=1e-14, atol=1e-14)
    # the live values, not the user's, entered: the outputs differ from the model's own
    assert not torch.allclose(f, model(x))

    v = torch.randn_like(f)
    grads = torch.autograd.grad(f, theta, v)
    expected_grads = torch.autograd.grad(expected, theta, v)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-13, atol=1e-13)
    assert all(p.grad is None for p in model.parameters())
    now = _user_tensors(model)
    assert now.keys() == own.keys() and all(now[n] is own[n] for n in own)


def test_failing_forward_puts_the_user_tensors_back():
    model = _Tied().to(DT)
    own = _user_tensors(model)
    sel = ParameterSelection(model)
    fm = FunctionalModel(model, sel)

    def broken(x):
        assert model.dec.weight is not own["enc.weight"]
        assert model.dec.weight is model.enc.weight  # still tied, to the live tensor
        raise RuntimeError("boom")

    model.forward = broken
    with pytest.raises(RuntimeError, match="boom"):
        fm([p.detach() for p in sel.params], torch.zeros(2, 4, dtype=DT))
    del model.forward
    now = _user_tensors(model)
    assert now.keys() == own.keys() and all(now[n] is own[n] for n in own)


def test_unchecked_grad_equals_autograd_grad():
    """``curvop._autograd.grad``: torch's gradients, ``None`` for an unused input, nothing
    accumulated, the graph kept only when asked, and torch's error for a non-differentiable
    output."""
    from curvop import _autograd

    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=DT, requires_grad=True)
    b = torch.randn(3, dtype=DT, requires_grad=True)
    unused = torch.randn(2, dtype=DT, requires_grad=True)
    x = torch.randn(5, 4, dtype=DT)
    f = torch.tanh(x @ w.T + b)
    v = torch.randn_like(f)
    got = _autograd.grad([f], [w, b, unused], [v], retain_graph=True, allow_unused=True)
    expected = torch.autograd.grad(f, [w, b, unused], v, retain_graph=True, allow_unused=True)
    assert got[2] is None and expected[2] is None
    for g, e in zip(got[:2], expected[:2]):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert w.grad is None and b.grad is None
    _autograd.grad([f], [w], [v])  # the graph was retained; this call frees it
    with pytest.raises(RuntimeError):
        _autograd.grad([f], [w], [v])
    with pytest.raises(RuntimeError):
        _autograd.grad([x.sum()], [w], [torch.ones((), dtype=DT)])


def test_unchecked_grad_falls_back_to_the_public_function(monkeypatch):
    """A torch whose private engine entry point takes other arguments: the public route."""
    from curvop import _autograd

    def changed(*args, **kwargs):
        raise TypeError("unexpected keyword argument 'accumulate_grad'")

    monkeypatch.setattr(_autograd, "_engine_run_backward", changed)
    w = torch.randn(3, dtype=DT, requires_grad=True)
    f = (w * w).sum()
    (g,) = _autograd.grad([f], [w], [torch.ones((), dtype=DT)])
    torch.testing.assert_close(g, 2 * w.detach(), rtol=0, atol=0)
    assert _autograd._engine_run_backward is None  # remembered: no second failing attempt
