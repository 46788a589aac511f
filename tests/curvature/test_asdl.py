"""ASDL specifics: cleanliness, unsupported modules, Monte-Carlo sampling, Hessian, Kron.

The conformance and invariant tests run the ASDL classes against the dense references; this file
covers what only ASDL needs: its attributes and hooks never outlive a call, what it cannot see
raises instead of being silently missed, its sampling is driven by the generator, and its
Kronecker factors have curvop's (laplace-torch's) scaling.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from curvop import FeatureExtractor, TorchGGN
from curvop.curvature.asdl import AsdlEF, AsdlGGN, AsdlHessian
from curvop.errors import NotSupportedError
from curvop.operators.kron import Kron

import reference as ref
from cases import Case, assert_untouched, register, snapshot

TOL = {"rtol": 1e-10, "atol": 1e-10}


def _flags(model):
    return [m._is_full_backward_hook for m in model.modules()]


def _blocks(model, H, last_layer=False):
    """Per-parameter diagonal blocks of a dense `(P, P)` curvature."""
    out, start = [], 0
    for p in ref.selected_params(model, last_layer):
        out.append(H[start:start + p.numel(), start:start + p.numel()])
        start += p.numel()
    return out


# --- cleanliness ------------------------------------------------------------------------


def test_every_call_in_sequence_leaves_the_model_as_it_was():
    model, x, y = Case("layernorm_mlp", "classification").build()
    model[3].bias.requires_grad_(False)  # a frozen parameter must stay frozen
    model[0].weight.grad = torch.full_like(model[0].weight, 3.0)  # the user's own gradient
    model[1].fisher = "mine"  # attribute names ASDL uses by default
    model[0].hessian = "mine too"
    register(model)
    flags = _flags(model)
    idx = torch.tensor([0, 5, 100])
    calls = [
        lambda: AsdlGGN(model, "classification").full(x, y),
        lambda: AsdlGGN(model, "classification").diag(x, y),
        lambda: AsdlGGN(model, "classification").jacobians(x),
        lambda: AsdlGGN(model, "classification").last_layer_jacobians(x),
        lambda: AsdlEF(model, "classification").gradients(x, y),
        lambda: AsdlEF(model, "classification", True).kron(x, y, N=6),
        lambda: AsdlGGN(model, "classification", subnetwork_indices=idx).full(x, y),
        lambda: AsdlGGN(model, "classification", stochastic=True,
                        generator=torch.Generator().manual_seed(0)).diag(x, y),
        lambda: AsdlEF(model, "classification").kron(x, y, N=6),  # LayerNorm: raises
        lambda: AsdlHessian(model, "classification").full(x, y),
        lambda: AsdlHessian(model, "classification").diag(x, y),
        lambda: AsdlHessian(model, "classification", subnetwork_indices=idx).full(x, y),
    ]
    before = snapshot(model)
    for call in calls:
        try:
            call()
        except NotSupportedError:
            pass
        assert_untouched(model, before)
        assert _flags(model) == flags  # ASDL's register_backward_hook sets this flag
        assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 3.0))
        assert model[1].fisher == "mine" and model[0].hessian == "mine too"
    # full backward hooks are still allowed on every layer ASDL hooked
    for m in model.modules():
        m.register_full_backward_hook(lambda *a: None).remove()


def test_works_under_no_grad_and_leaves_grad_mode():
    model, x, y = Case("tanh_mlp", "regression").build()
    with torch.no_grad():
        H = AsdlGGN(model, "regression").full(x, y)[1]
        Hh = AsdlHessian(model, "regression").full(x, y)[1]
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(H, ref.ggn(model, x, y, "regression"), **TOL)
    torch.testing.assert_close(Hh, ref.hessian(model, x, y, "regression"), **TOL)


def test_missing_asdl_is_an_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "asdl", None)
    with pytest.raises(ImportError, match=r"curvop\[asdl\]"):
        AsdlGGN(nn.Linear(2, 2), "regression")


# --- what ASDL cannot see raises ----------------------------------------------------------


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _conv(**kw):
    return nn.Sequential(nn.Unflatten(1, (2, 2, 1)), nn.Conv2d(2, 2, 1, **kw), nn.Flatten())


UNSUPPORTED_MODELS = {
    "custom_parameter": (lambda: Case("two_path", "regression").build()[0],
                         r"parameter 'scale'.*'scale' of the model itself \(TwoPath\)"),
    "unknown_layer": (lambda: nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 1, 3),
                                            nn.Flatten(), nn.Linear(2, 4)),
                      r"module '1' \(Conv1d\).*supports Linear, Conv2d"),
    "conv_groups": (lambda: _conv(groups=2), r"module '1' \(Conv2d\) with groups=2"),
    "conv_dilation": (lambda: _conv(dilation=2), r"dilation=\(2, 2\)"),
    "called_twice": (_Twice, r"module 'lin' \(Linear\) is called more than once"),
    "tied_weights": (_Tied, r"parameter 'a.weight' is shared by \['a', 'b'\]"),
    "sequence_inputs": (lambda: nn.Sequential(nn.Unflatten(1, (2, 2)), nn.Linear(2, 2),
                                              nn.Flatten()),
                        r"module '1' \(Linear\) receives inputs of shape \(5, 2, 2\)"),
    "zero_norm_weight": (lambda: _zero_layernorm(), r"module '1' \(LayerNorm\) with zero entries"),
}


def _zero_layernorm():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with torch.no_grad():
        net[1].weight[2] = 0.0
    return net


@pytest.mark.parametrize("name", list(UNSUPPORTED_MODELS))
def test_unsupported_modules_raise_naming_the_module(name):
    build, match = UNSUPPORTED_MODELS[name]
    model = register(build().double().eval())
    x = torch.randn(5, 4 if name != "custom_parameter" else 16, dtype=torch.float64)
    y = torch.randn(x.shape[0], model(x).shape[1], dtype=torch.float64)
    for method in ("jacobians", "gradients", "full", "diag", "kron"):
        for cls in (AsdlGGN, AsdlEF):
            iface = cls(model, "regression")
            args = {"jacobians": (x,), "kron": (x, y, 5)}.get(method, (x, y))
            with pytest.raises(NotSupportedError, match=match):
                getattr(iface, method)(*args)


def test_kron_needs_layers_with_a_kronecker_form_and_whole_tensors():
    model, x, y = Case("layernorm_mlp", "regression").build()
    with pytest.raises(NotSupportedError, match=r"module '1' \(LayerNorm\) has no Kronecker"):
        AsdlGGN(model, "regression").kron(x, y, N=6)
    model, x, y = Case("tanh_mlp", "regression").build()
    with pytest.raises(NotSupportedError, match="whole parameter tensors"):
        AsdlGGN(model, "regression", subnetwork_indices=torch.tensor([0, 1])).kron(x, y, N=6)
    with pytest.raises(NotSupportedError, match="AsdlHessian does not support `kron`; use "
                                                "TorchHessian"):
        AsdlHessian(model, "regression").kron(x, y, N=6)
    with pytest.raises(TypeError, match="takes no options"):
        AsdlGGN(model, "regression").kron(x, y, N=6, fallback="diag")


def test_only_selected_parameters_need_support():
    """TwoPath's `scale` is out of ASDL's reach, but a subnetwork without it is fine."""
    model, x, y = Case("two_path", "classification").build()
    # embed.weight, embed.bias, frozen.bias (its weight is frozen), head.weight, head.bias
    idx = torch.tensor([8, 86, 5, 92, 100, 112])  # `scale` holds entries 0-4
    H = AsdlGGN(model, "classification", subnetwork_indices=idx).full(x, y)[1]
    H_ref = ref.ggn(model, x, y, "classification")
    torch.testing.assert_close(H, H_ref[idx][:, idx], **TOL)
    h = AsdlEF(model, "classification", subnetwork_indices=idx).diag(x, y)[1]
    torch.testing.assert_close(h, ref.ef(model, x, y, "classification").diagonal()[idx], **TOL)


class _Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.unused, self.b = nn.Linear(3, 4), nn.Linear(2, 2), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_unused_layer_gives_zero_curvature():
    net = register(_Unused().double())
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    for kind, cls in (("ggn", AsdlGGN), ("ef", AsdlEF), ("hessian", AsdlHessian)):
        iface = cls(net, "classification")
        H = iface.full(x, y)[1]
        torch.testing.assert_close(H, ref.CURVATURES[kind](net, x, y, "classification"), **TOL)
        torch.testing.assert_close(iface.diag(x, y)[1], H.diagonal(), **TOL)
        assert torch.count_nonzero(H[16:22]) == 0
    J = AsdlGGN(net, "classification").jacobians(x)[0]
    torch.testing.assert_close(J, ref.jacobians(net, x)[0].transpose(1, 2), **TOL)


# --- Monte-Carlo sampling -----------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_mc_fisher_follows_the_generator_and_spares_the_global_rng(likelihood):
    model, x, y = Case("tanh_mlp", likelihood, batch=4).build()

    def mc(seed, n=2):
        return AsdlGGN(model, likelihood, stochastic=True, num_samples=n,
                       generator=torch.Generator().manual_seed(seed))

    state = torch.get_rng_state()
    a, b = mc(3), mc(3)
    torch.testing.assert_close(a.full(x, y)[1], b.full(x, y)[1], rtol=0, atol=0)
    torch.testing.assert_close(a.diag(x, y)[1], b.diag(x, y)[1], rtol=0, atol=0)
    ka, kb = a.kron(x, y, N=4)[1], b.kron(x, y, N=4)[1]
    torch.testing.assert_close(ka.to_dense(), kb.to_dense(), rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(mc(3).full(x, y)[1], mc(4).full(x, y)[1])
    # ASDL divides each sampled loss by num_samples before squaring: curvop undoes it (else
    # the estimate would be 200 times too small). With 200 samples per datum the relative
    # error of the average is 0.01-0.07 for these models.
    exact = AsdlGGN(model, likelihood).diag(x, y)[1]
    approx = mc(0, 200).diag(x, y)[1]
    assert (approx - exact).norm() / exact.norm() < 0.2


# --- Hessian ------------------------------------------------------------------------------


def test_hessian_signature_full_and_diag():
    model, x, y = Case("two_path", "regression").build()
    H_ref = ref.hessian(model, x, y, "regression")
    hess = AsdlHessian(model, "regression", False, 3)
    assert hess.low_rank == 3 and hess.subnetwork_indices is None
    torch.testing.assert_close(hess.full(x, y)[1], H_ref, **TOL)  # autograd: any module
    with pytest.raises(NotSupportedError, match="parameter 'scale'"):
        hess.diag(x, y)  # module-wise blocks: weights and biases only
    idx = torch.tensor([7, 0, 95])
    sub = AsdlHessian(model, "regression", subnetwork_indices=idx)
    torch.testing.assert_close(sub.full(x, y)[1], H_ref[idx][:, idx], **TOL)
    with pytest.raises(TypeError):
        AsdlHessian(model, "regression", False, 10, idx)  # subnetwork_indices is keyword-only
    with pytest.raises(ValueError, match="`low_rank` must be a positive int"):
        AsdlHessian(model, "regression", low_rank=0)


# --- Kron -------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["tanh_mlp", "mlp_nobias", "cnn"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kron_is_exact_for_one_datum(model_name, likelihood):
    """KFAC of one datum is the exact block diagonal of Linear (and 1x1-output Conv) layers."""
    model, x, y = Case(model_name, likelihood, batch=1).build()
    for kind, cls in (("ggn", AsdlGGN), ("ef", AsdlEF)):
        loss, K = cls(model, likelihood).kron(x, y, N=1)
        assert isinstance(K, Kron)
        torch.testing.assert_close(loss, ref.loss(model, x, y, likelihood))
        exact = _blocks(model, ref.CURVATURES[kind](model, x, y, likelihood))
        got = [torch.kron(*b) if len(b) == 2 else b[0] for b in K.kfacs]
        assert len(got) == len(exact)
        first = 2 if model_name == "cnn" else 0  # the first conv has 16 output locations
        for G, E in list(zip(got, exact))[first:]:
            torch.testing.assert_close(G, E, **TOL)


def test_kron_factors_and_n_scaling_on_a_batch():
    """Last layer: ``[Σ Λ_n, Σ φ φᵀ / N]`` for the weight and ``[Σ Λ_n]`` for the bias."""
    model, x, y = Case("tanh_mlp", "classification").build()
    _, phi = FeatureExtractor(model).forward_with_features(x)
    f = model(x).detach()
    Lam = ref.output_hessian(f, "classification").sum(0)
    _, K = AsdlGGN(model, "classification", last_layer=True).kron(x, y, N=10)
    (B, A), (C,) = K.kfacs
    torch.testing.assert_close(B, Lam, **TOL)
    torch.testing.assert_close(A, phi.T @ phi / 10, **TOL)
    torch.testing.assert_close(C, Lam, **TOL)
    # MC: ASDL's 1/num_samples shrinkage is undone on the output-side factor as well
    g = torch.Generator().manual_seed(0)
    _, K = AsdlGGN(model, "classification", last_layer=True, stochastic=True, num_samples=300,
                   generator=g).kron(x, y, N=10)
    assert (K.kfacs[0][0] - Lam).norm() / Lam.norm() < 0.1
    torch.testing.assert_close(K.kfacs[0][1], phi.T @ phi / 10, **TOL)



# --- in-place operations in forward ---------------------------------------------------------


class _NormResidual(nn.Module):
    """``layer → norm → out += x → ReLU(inplace) → head``: torchvision's BasicBlock pattern.

    ASDL recovers a norm layer's normalised input from its saved output in backward; the
    in-place residual addition changes that output after ASDL saved it.
    """

    def __init__(self, conv: bool):
        super().__init__()
        if conv:  # inputs (B, 2, 3, 3)
            self.layer, self.norm = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)
            self.head = nn.Linear(18, 3)
        else:  # inputs (B, 4)
            self.layer, self.norm, self.head = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.norm(self.layer(x))
        out += x
        return self.head(self.relu(out).flatten(1))


class _TinyResNet(nn.Module):
    """A stem and one torchvision ``BasicBlock`` (in-place ReLUs, ``out += identity``)."""

    def __init__(self):
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn, self.relu = nn.BatchNorm2d(3), nn.ReLU(inplace=True)
        self.block = BasicBlock(3, 3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = self.block(self.relu(self.bn(self.conv(x))))
        return self.fc(h.mean((2, 3)))


def _in_place_model(name):
    """The model in eval mode, random norm affines and BatchNorm statistics, and its inputs."""
    torch.manual_seed(3)
    if name == "tiny_resnet":
        pytest.importorskip("torchvision")
        model, x = _TinyResNet(), torch.randn(4, 2, 4, 4)
    else:
        model = _NormResidual(conv=name == "conv_batchnorm_residual")
        x = torch.randn(5, 2, 3, 3) if name == "conv_batchnorm_residual" else torch.randn(5, 4)
    model, x = model.double(), x.double()
    with torch.no_grad():
        model.train()(x)  # BatchNorm running statistics from the batch (momentum 0.1)
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return register(model.eval()), x


@pytest.mark.parametrize("name", ["conv_batchnorm_residual", "layernorm_residual",
                                  "tiny_resnet"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_in_place_change_of_a_norm_output_is_exact(name, likelihood):
    """A norm layer's output changed in place later (``out += x``) leaves ASDL exact.

    Without curvop's copy of the output, ASDL's BatchNorm/LayerNorm results (per-sample
    gradients, GGN, EF) are silently off by 5-20% on these models.
    """
    model, x = _in_place_model(name)
    C = 3
    y = (torch.tensor([0, 1, 2, 1, 0])[: x.shape[0]] if likelihood == "classification"
         else torch.randn(x.shape[0], C, dtype=torch.float64))
    for kind, cls in (("ggn", AsdlGGN), ("ef", AsdlEF)):
        H_ref = ref.CURVATURES[kind](model, x, y, likelihood)
        loss, H = cls(model, likelihood).full(x, y)
        torch.testing.assert_close(loss, ref.loss(model, x, y, likelihood), **TOL)
        torch.testing.assert_close(H, H_ref, **TOL)
        torch.testing.assert_close(cls(model, likelihood).diag(x, y)[1], H_ref.diagonal(),
                                   **TOL)
        if kind == "ggn":  # the backend the benchmark compared against
            torch.testing.assert_close(TorchGGN(model, likelihood).diag(x, y)[1],
                                       H_ref.diagonal(), **TOL)
    J_ref, f_ref = ref.jacobians(model, x)
    J, f = AsdlGGN(model, likelihood).jacobians(x)
    torch.testing.assert_close(J, J_ref.transpose(1, 2), **TOL)
    torch.testing.assert_close(f, f_ref, **TOL)
    torch.testing.assert_close(AsdlEF(model, likelihood).gradients(x, y)[1],
                               ref.gradients(model, x, y, likelihood), **TOL)


class _ChangedInput(nn.Module):
    """The input of ``b`` is doubled in place after ``b`` ran: ASDL would read the new value."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        out = self.b(h)
        h.mul_(2.0)
        return out


def test_in_place_change_of_a_saved_input_raises_naming_the_layer():
    model = register(_ChangedInput().double())
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    match = r"input of module 'b' \(Linear\) is modified in place.*use TorchGGN"
    for method, args in (("jacobians", (x,)), ("gradients", (x, y)), ("full", (x, y)),
                         ("diag", (x, y))):
        for cls in (AsdlGGN, AsdlEF):
            with pytest.raises(NotSupportedError, match=match):
                getattr(cls(model, "classification"), method)(*args)
