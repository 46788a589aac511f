"""Closed forms for Linear/Conv layers (exact diagonal through layer taps) and their guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvop
from curvop._functional import Batch, FunctionalModel
from curvop._taps import tap_layers
from curvop.layers import diag_sq_sum, handler_for, per_sample_grads, why_no_handler
from curvop.likelihoods import Likelihood
from curvop.params import ParameterSelection

import reference as ref
from cases import Case, register


class SeqLinear(nn.Module):
    """A Linear applied over a sequence dimension (weight sharing), then mean-pooled."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x.reshape(x.shape[0], 4, 4))).mean(1))


class ReusedWeight(nn.Module):
    """A Linear whose weight is also used outside its forward: the taps must be rejected."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)) + x @ self.lin.weight.T * 0.3)


def conv_net(dims, groups=1, stride=1, dilation=1, padding=1):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    shape = {1: (2, 8), 2: (2, 4, 2), 3: (2, 2, 2, 2)}[dims]
    return nn.Sequential(
        nn.Unflatten(1, shape), conv(2, 4, 2, stride=stride, dilation=dilation, padding=padding,
                                     groups=groups),
        nn.Tanh(), conv(4, 2, 1, groups=groups if groups <= 2 else 1), nn.Flatten(),
        nn.LazyLinear(3),
    )


def _taps_used(model, x, y, likelihood="classification"):
    lik = Likelihood(likelihood)
    sel = ParameterSelection(model)
    fm = FunctionalModel(model, sel)
    with torch.no_grad():
        f = fm(tuple(sel.detached()), x)
    batch = Batch(fm, x, y, f, lik, 1 << 26)
    return tap_layers(batch, lik.sqrt_output_hessian(f)) is not None


MODELS = {
    "conv1d": lambda: conv_net(1),
    "conv1d_stride_dilation": lambda: conv_net(1, stride=2, dilation=2, padding=2),
    "conv2d_groups": lambda: conv_net(2, groups=2),
    "conv3d": lambda: conv_net(3),
    "seq_linear": SeqLinear,
}


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("name", list(MODELS))
def test_closed_form_diag_matches_reference(name, likelihood):
    torch.manual_seed(0)
    C = 3
    model = MODELS[name]().double()
    x = torch.randn(5, 16, dtype=torch.float64)
    model(x)  # materialise lazy layers
    model = register(model.eval())
    y = (torch.randint(0, C, (5,)) if likelihood == "classification"
         else torch.randn(5, C, dtype=torch.float64))
    assert _taps_used(model, x, y, likelihood)
    H = ref.ggn(model, x, y, likelihood)
    _, h = curvop.TorchGGN(model, likelihood).diag(x, y)
    torch.testing.assert_close(h, H.diagonal(), rtol=1e-10, atol=1e-12)


def test_taps_rejected_when_weight_used_outside_its_layer():
    torch.manual_seed(0)
    model = register(ReusedWeight().double())
    x, y = torch.randn(5, 16, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert not _taps_used(model, x, y)
    H = ref.ggn(model, x, y, "classification")
    _, h = curvop.TorchGGN(model, "classification").diag(x, y)
    torch.testing.assert_close(h, H.diagonal(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,expected", [("tanh_mlp", True), ("cnn", True),
                                           ("mlp_nobias", True), ("layernorm_mlp", False),
                                           ("two_path", False)])
def test_which_models_use_the_closed_form(name, expected):
    model, x, y = Case(name, "classification").build()
    assert _taps_used(model, x, y) is expected


def test_inplace_relu_does_not_corrupt_taps():
    torch.manual_seed(0)
    model = register(nn.Sequential(nn.Linear(16, 6), nn.ReLU(inplace=True),
                                   nn.Linear(6, 3)).double())
    x, y = torch.randn(7, 16, dtype=torch.float64), torch.randint(0, 3, (7,))
    assert _taps_used(model, x, y)
    _, h = curvop.TorchGGN(model, "classification").diag(x, y)
    torch.testing.assert_close(h, ref.ggn(model, x, y, "classification").diagonal(),
                               rtol=1e-10, atol=1e-12)


def test_output_changed_in_place_is_tapped_from_a_copy_and_remembered():
    """Taps differentiate a layer's output uncopied unless the forward changes it in place.

    A forward that does (in-place ReLU, in-place scaling of the model's output) is redone with
    copies, and its structure is remembered so that later calls copy from the start; the
    curvature is the one of the same model without in-place operations.
    """
    from curvop import _taps

    class Scaled(nn.Module):
        def __init__(self, inplace: bool):
            super().__init__()
            self.inplace = inplace
            self.net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=inplace), nn.Linear(4, 3))

        def forward(self, x):
            out = self.net(x)
            return out.mul_(2.0) if self.inplace else out * 2.0

    torch.manual_seed(0)
    plain, inplace = Scaled(False).double(), Scaled(True).double()
    inplace.load_state_dict(plain.state_dict())
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    ggn = curvop.TorchGGN(inplace, "classification")
    before = {k for k in _taps._CHANGED_IN_PLACE if k[0] == id(inplace)}
    assert not before
    for _ in range(2):  # the second call copies from the start
        K = ggn.kron(x, y, 6)[1].to_dense()
        assert {k for k in _taps._CHANGED_IN_PLACE if k[0] == id(inplace)}
        torch.testing.assert_close(
            K, curvop.TorchGGN(plain, "classification").kron(x, y, 6)[1].to_dense(),
            rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ggn.diag(x, y)[1], ref.ggn(plain, x, y, "classification")
                               .diagonal(), rtol=1e-10, atol=1e-12)
    assert not {k for k in _taps._CHANGED_IN_PLACE if k[0] == id(plain)}


# --- nn.Embedding ---------------------------------------------------------------------------


class EmbNet(nn.Module):
    """Embedding over 4 tokens → tanh → mean-pooled → head."""

    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(9, 5, **kw)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).mean(1))


def _batch(model, x, y, likelihood="classification"):
    lik = Likelihood(likelihood)
    sel = ParameterSelection(model)
    fm = FunctionalModel(model, sel)
    with torch.no_grad():
        f = fm(tuple(sel.detached()), x)
    return Batch(fm, x, y, f, lik, 1 << 26), lik.sqrt_output_hessian(f)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_taps_give_the_exact_diagonal_in_the_weight_layout(padding_idx):
    """The taps pass their check against autograd; ``diag_sq_sum(transposed=True)`` is the
    exact GGN diagonal of the `(V, D)` weight (zero on the padding row); the interface's diag
    (which does not read the layout, so it takes the per-sample path for the embedding) too."""
    torch.manual_seed(0)
    model = register(EmbNet(padding_idx=padding_idx).double())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 9, (6, 4), generator=g), torch.randint(0, 3, (6,), generator=g)
    x[:2, :2] = 0
    H = ref.ggn(model, x, y, "classification").diagonal()
    batch, S = _batch(model, x, y)
    assert tap_layers(batch, S) is None  # callers that do not read Tap.transposed
    taps, unhandled = tap_layers(batch, S, partial=True)
    assert [t.name for t in taps] == ["head"] and "transposed" in unhandled[0].reason
    taps = tap_layers(batch, S, transposed=True)
    assert taps is not None and taps[0].transposed and taps[0].a.shape == (6, 1, 4, 9)
    w = diag_sq_sum(taps[0].a, taps[0].g, False, transposed=True)[0]
    assert w.shape == (9, 5)
    torch.testing.assert_close(w.reshape(-1), H[:45], rtol=1e-10, atol=1e-12)
    if padding_idx is not None:
        assert w[padding_idx].abs().max() == 0
    ps = per_sample_grads(taps[0].a, taps[0].g[0], False, transposed=True)[0]
    for n in range(6):
        ref_g = torch.autograd.grad(model(x[n:n + 1]), model.emb.weight, S[n:n + 1, :, 0])[0]
        torch.testing.assert_close(ps[n], ref_g, rtol=1e-10, atol=1e-12)
    _, h = curvop.TorchGGN(model, "classification").diag(x, y)
    torch.testing.assert_close(h, H, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw, reason", [({"max_norm": 1.0}, "max_norm"),
                                        ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
                                        ({"sparse": True}, "sparse")])
def test_embedding_options_without_a_closed_form(kw, reason):
    emb = nn.Embedding(9, 5, **kw)
    assert handler_for(emb) is None and reason in why_no_handler(emb)
    assert handler_for(nn.Embedding(9, 5, padding_idx=3)) is not None
