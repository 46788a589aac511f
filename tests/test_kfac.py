"""Kronecker factors of the native backend (TorchGGN / TorchEF ``kron``), in float64.

Truth: the dense brute-force curvatures of ``reference.py`` where KFAC is exact (one datum,
deep linear networks with one output, the last layer of a regression network), and everywhere
else factors built here from autograd's per-sample layer inputs and output gradients (hooks,
an im2col of our own), following the formulas of :mod:`curvop.kfac`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import curvop
from curvop.errors import InputError, InputTypeError, NotSupportedError
from curvop.likelihoods import Likelihood

import reference as ref
from cases import Case, Counted, register

TOL = {"rtol": 1e-10, "atol": 1e-10}
DT = torch.float64


# --- models ------------------------------------------------------------------------------


class SeqLinear(nn.Module):
    """A Linear over a sequence of 3 positions (weight sharing), then a head on the flattened."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(15, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x.reshape(x.shape[0], 3, 4))).flatten(1))


class Reused(nn.Module):
    """``lin``'s weight also enters outside its forward (tied): no (a, g) picture."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)) + 0.3 * x @ self.lin.weight.T)


class Twice(nn.Module):
    """``lin`` is called twice in one forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lin(torch.tanh(self.lin(x))))


def _seq(*layers):
    return nn.Sequential(*layers)


#: name -> (factory, input shape without batch)
MODELS = {
    "mlp": (lambda: _seq(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                         nn.Linear(4, 3)), (6,)),
    # stride, dilation, padding, then a grouped convolution
    "cnn": (lambda: _seq(nn.Conv2d(2, 4, 3, stride=2, dilation=2, padding=2), nn.Tanh(),
                         nn.Conv2d(4, 4, 2, groups=2, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(64, 3)), (2, 6, 6)),
    "conv1d": (lambda: _seq(nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=2), nn.Tanh(),
                            nn.Flatten(), nn.Linear(12, 3)), (2, 9)),
    "conv3d": (lambda: _seq(nn.Conv3d(1, 2, 2, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                            nn.Linear(16, 3)), (1, 3, 3, 3)),
    "seq": (SeqLinear, (12,)),
    # T == 1 for both convolutions: KFAC is exact for one datum, per group
    "grouped_t1": (lambda: _seq(nn.Conv2d(4, 6, 3, groups=2), nn.Tanh(), nn.Flatten(),
                                nn.Linear(6, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)),
                   (4, 3, 3)),
}


def build(name, likelihood="classification", batch=6, seed=0, C=3):
    """``(model, x, y)`` in float64, the model registered for the untouched-model check."""
    factory, shape = MODELS[name]
    torch.manual_seed(seed)
    model = factory().to(DT).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *shape, generator=g, dtype=DT)
    if likelihood == "classification":
        y = torch.randint(0, C, (batch,), generator=g)
    else:
        y = torch.randn(batch, C, generator=g, dtype=DT)
    register(model)
    return model, x, y


# --- brute force ---------------------------------------------------------------------------


def im2col(conv, x):
    """`(n, C_in, *spatial)` → patches `(n, T, C_in, *kernel)` with Tensor.unfold per dim."""
    d = len(conv.kernel_size)
    pad = []
    for p in reversed(conv.padding):
        pad += [p, p]
    x = nn.functional.pad(x, pad)
    for i in range(d):
        k, s, dil = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)[..., ::dil]
    n, C, T = x.shape[0], x.shape[1], math.prod(x.shape[2:2 + d])
    perm = (0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    return x.permute(perm).reshape(n, T, C, *conv.kernel_size)


def layer_pairs(model, x, S):
    """Per layer: ``a`` `(n, G, T, I)` and ``g`` `(K, n, G, T, O/G)` from hooks and autograd."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d,
                                                            nn.Conv3d))]
    ins, outs = {}, {}

    def hook(m, inp, out):
        ins[m], outs[m] = inp[0].detach(), out

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        f = model(x)
    finally:
        for h in handles:
            h.remove()
    grads = [torch.autograd.grad(f, [outs[m] for m in layers], S[:, :, k], retain_graph=True)
             for k in range(S.shape[-1])]
    pairs = {}
    for i, m in enumerate(layers):
        g = torch.stack([gk[i] for gk in grads])  # (K, n, O, ...) or (K, n, ..., O)
        n = x.shape[0]
        if isinstance(m, nn.Linear):
            a = ins[m].reshape(n, 1, -1, m.in_features)
            g = g.reshape(g.shape[0], n, 1, -1, m.out_features)
        else:
            G = m.groups
            p = im2col(m, ins[m])  # (n, T, C_in, *k)
            T = p.shape[1]
            a = p.reshape(n, T, G, -1).transpose(1, 2)
            g = g.reshape(g.shape[0], n, G, -1, T).transpose(-1, -2)
        pairs[m] = (a, g)
    return pairs


def brute_kfacs(model, x, S, N, approx):
    """The expected ``kfacs`` (parameter order; one ``[A_g, B_g]`` per group of a weight)."""
    pairs = layer_pairs(model, x, S)
    kfacs = []
    for m, (a, g) in pairs.items():
        T = a.shape[2]
        if approx == "expand":
            A = torch.einsum("kngto,kngtp->gop", g, g)
            B = torch.einsum("ngti,ngtj->gij", a, a) / (N * T)
        else:
            gs, am = g.sum(3), a.mean(2)
            A = torch.einsum("kngo,kngp->gop", gs, gs)
            B = torch.einsum("ngi,ngj->gij", am, am) / N
        kfacs += [[Ag, Bg] for Ag, Bg in zip(A, B)]
        if m.bias is not None:
            gb = g.sum(3).flatten(2)
            kfacs.append([torch.einsum("kno,knp->op", gb, gb)])
    return kfacs


def sqrt_lambda(f, likelihood):
    """A square root of Λ through its eigendecomposition (not curvop's formula)."""
    L = ref.output_hessian(f.detach(), likelihood)
    w, Q = torch.linalg.eigh(L)
    return Q * w.clamp_min(0).sqrt().unsqueeze(-2)


def ef_sqrt(model, x, y, likelihood):
    f = model(x).detach().requires_grad_()
    r = torch.autograd.grad(ref.loss_fn(likelihood, f, y), f)[0]
    return r.unsqueeze(-1)


def assert_kfacs(got, expected):
    assert [len(b) for b in got] == [len(b) for b in expected]
    for gb, eb in zip(got, expected):
        for F, E in zip(gb, eb):
            torch.testing.assert_close(F, E, **TOL)


def diag_blocks(H, sizes):
    """``block_diag`` of the diagonal blocks of ``H`` at ``sizes``."""
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    return torch.block_diag(*[H[s:e, s:e] for s, e in zip(starts[:-1], starts[1:])])


def param_sizes(model, last_layer=False):
    return [p.numel() for p in ref.selected_params(model, last_layer)]


# --- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("name", ["tanh_mlp", "mlp_nobias", "two_path", "layernorm_mlp"])
def test_one_datum_ggn_and_ef_are_the_dense_blocks(name, likelihood):
    """One datum, N = 1: every block is exact (LayerNorm / TwoPath's `scale` by `full`)."""
    model, x, y = Case(name, likelihood, batch=1).build()
    sizes = param_sizes(model)
    for cls, curv in ((curvop.TorchGGN, ref.ggn), (curvop.TorchEF, ref.ef)):
        for approx in ("expand", "reduce"):
            _, K = cls(model, likelihood).kron(x, y, N=1, approx=approx, fallback="full")
            assert K.block_sizes == tuple(sizes)
            torch.testing.assert_close(K.to_dense(), diag_blocks(curv(model, x, y, likelihood),
                                                                 sizes), **TOL)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_one_datum_mc_fisher_with_the_same_samples(likelihood):
    model, x, y = Case("tanh_mlp", likelihood, batch=1).build()
    gen = torch.Generator().manual_seed(3)
    _, K = curvop.TorchGGN(model, likelihood, stochastic=True, num_samples=4,
                           generator=gen).kron(x, y, N=1)
    J, f = ref.jacobians(model, x)
    S = Likelihood(likelihood).sampled_sqrt_output_hessian(f, 4, torch.Generator().manual_seed(3))
    mc = torch.einsum("bcp,bck,bdk,bdq->pq", J, S, S, J)
    torch.testing.assert_close(K.to_dense(), diag_blocks(mc, param_sizes(model)), **TOL)


def test_one_datum_grouped_convolution_is_exact_per_group():
    """groups=2 with one output position: G blocks [A_g, B_g], each the exact group block."""
    model, x, y = build("grouped_t1", batch=1)
    _, K = curvop.TorchGGN(model, "classification").kron(x, y, N=1)
    per_group = 3 * 2 * 9  # (O/G) * (C_in/G) * 3 * 3
    sizes = [per_group, per_group, 6, 24, 12, 3]
    assert K.block_sizes == tuple(sizes)
    torch.testing.assert_close(K.to_dense(), diag_blocks(ref.ggn(model, x, y, "classification"),
                                                         sizes), **TOL)


def test_deep_linear_network_with_one_output_is_exact():
    torch.manual_seed(0)
    model = register(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(3, 1)).to(DT))
    x, y = torch.randn(7, 4, dtype=DT), torch.randn(7, 1, dtype=DT)
    _, K = curvop.TorchGGN(model, "regression").kron(x, y, N=7)
    torch.testing.assert_close(K.to_dense(), diag_blocks(ref.ggn(model, x, y, "regression"),
                                                         param_sizes(model)), **TOL)


def test_last_layer_of_a_regression_network_is_exact():
    model, x, y = Case("tanh_mlp", "regression", batch=6).build()
    _, K = curvop.TorchGGN(model, "regression", last_layer=True).kron(x, y, N=6)
    assert K.layout == (2, 1)
    G = ref.ggn(model, x, y, "regression", last_layer=True)
    torch.testing.assert_close(K.to_dense(), diag_blocks(G, param_sizes(model, True)), **TOL)


# --- factors against brute force -------------------------------------------------------------


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d", "conv3d", "seq"])
def test_ggn_factors_equal_brute_force(name, approx):
    model, x, y = build(name)
    _, K = curvop.TorchGGN(model, "classification").kron(x, y, N=10, approx=approx)
    S = sqrt_lambda(model(x), "classification")
    assert_kfacs(K.kfacs, brute_kfacs(model, x, S, 10, approx))


@pytest.mark.parametrize("name", ["cnn", "seq"])
def test_ef_and_regression_factors_equal_brute_force(name):
    model, x, y = build(name, "regression")
    _, K = curvop.TorchGGN(model, "regression").kron(x, y, N=8, approx="reduce")
    S = sqrt_lambda(model(x), "regression")
    assert_kfacs(K.kfacs, brute_kfacs(model, x, S, 8, "reduce"))
    _, K = curvop.TorchEF(model, "regression").kron(x, y, N=8)
    assert_kfacs(K.kfacs, brute_kfacs(model, x, ef_sqrt(model, x, y, "regression"), 8, "expand"))


def test_mc_factors_equal_brute_force_and_are_reproducible():
    model, x, y = build("cnn")

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return curvop.TorchGGN(model, "classification", stochastic=True, num_samples=2,
                               generator=gen).kron(x, y, N=6)[1]

    K1, K2, K3 = run(7), run(7), run(8)
    assert torch.equal(K1.to_dense(), K2.to_dense())
    assert not torch.allclose(K1.to_dense(), K3.to_dense())
    S = Likelihood("classification").sampled_sqrt_output_hessian(
        model(x).detach(), 2, torch.Generator().manual_seed(7))
    assert_kfacs(K1.kfacs, brute_kfacs(model, x, S, 6, "expand"))


def test_expand_and_reduce_agree_without_weight_sharing_only():
    model, x, y = build("mlp")
    iface = curvop.TorchGGN(model, "classification")
    assert_kfacs(iface.kron(x, y, N=6)[1].kfacs, iface.kron(x, y, N=6, approx="reduce")[1].kfacs)
    model, x, y = build("seq")
    iface = curvop.TorchGGN(model, "classification")
    expand, reduce = (iface.kron(x, y, N=6, approx=a)[1].kfacs[0] for a in ("expand", "reduce"))
    assert not torch.allclose(expand[0], reduce[0]) and not torch.allclose(expand[1], reduce[1])


@pytest.mark.parametrize("name, cls", [("cnn", curvop.TorchGGN), ("seq", curvop.TorchEF)])
def test_batches_accumulate_to_the_full_batch(name, cls):
    model, x, y = build(name, batch=7)
    iface = cls(model, "classification")
    for approx in ("expand", "reduce"):
        full = iface.kron(x, y, N=20, approx=approx)[1]
        parts = [iface.kron(x[s], y[s], N=20, approx=approx)[1]
                 for s in (slice(0, 3), slice(3, 7))]
        assert_kfacs(parts[0].accumulate(parts[1]).kfacs, full.kfacs)


def test_chunked_samples_give_the_same_factors():
    model, x, y = build("cnn")
    one = curvop.TorchGGN(model, "classification").kron(x, y, N=6)[1]
    chunked = curvop.TorchGGN(model, "classification", memory_budget=1).kron(x, y, N=6)[1]
    assert_kfacs(chunked.kfacs, one.kfacs)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_matches_laplace_torch_backpack_kflr_on_an_mlp(likelihood):
    """Same blocks as laplace-torch 0.3's BackPackGGN.kron (mini-batch M=6 of N=10).

    Factors are identical for classification; for regression laplace-torch's factors are
    ``(√2 A, B / √2)``: BackPACK's MSE square root carries the factor 2 and laplace-torch
    multiplies the Kron by ``factor = 1/2``, which its ``Kron.__mul__`` spreads as ``√(1/2)``
    over both factors. The blocks ``A ⊗ B`` agree.
    """
    BackPackGGN = pytest.importorskip("laplace.curvature").BackPackGGN
    model, x, y = Case("tanh_mlp", likelihood).build()
    _, K = curvop.TorchGGN(model, likelihood).kron(x, y, N=10)
    _, L = BackPackGGN(copy.deepcopy(model), likelihood).kron(x, y, N=10)
    ratio = 1.0 if likelihood == "classification" else math.sqrt(2)
    assert [len(b) for b in L.kfacs] == list(K.layout)
    for ours, theirs in zip(K.kfacs, L.kfacs):
        if len(ours) == 1:
            torch.testing.assert_close(ours[0], theirs[0], **TOL)
        else:
            torch.testing.assert_close(ratio * ours[0], theirs[0], **TOL)
            torch.testing.assert_close(ours[1] / ratio, theirs[1], **TOL)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_laplace_torch_backpack_convolution_factors_are_as_documented():
    """BackPACK's conv KFLR: our `reduce` output side ⊗ T times our `expand` input side."""
    BackPackGGN = pytest.importorskip("laplace.curvature").BackPackGGN
    model, x, y = build("cnn")
    model = register(nn.Sequential(model[0], model[1], nn.Flatten(), nn.Linear(36, 3)).to(DT))
    _, L = BackPackGGN(copy.deepcopy(model), "classification").kron(x, y, N=10)
    iface = curvop.TorchGGN(model, "classification")
    expand, reduce = (iface.kron(x, y, N=10, approx=a)[1].kfacs for a in ("expand", "reduce"))
    T = 9  # output positions of the convolution
    torch.testing.assert_close(L.kfacs[0][0], reduce[0][0], **TOL)
    torch.testing.assert_close(L.kfacs[0][1], T * expand[0][1], **TOL)
    for i in (1, 2, 3):  # the bias and the Linear: identical
        for F, G in zip(L.kfacs[i], expand[i]):
            torch.testing.assert_close(F, G, **TOL)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["conv", "seq"])
def test_weight_blocks_match_curvlinops(name, approx):
    """curvlinops' KFAC has the same weight blocks; its `expand` bias differs (documented).

    curvlinops' expand bias block is Σ_{k,n,t} g gᵀ (positions as data); ours is the exact
    bias block, which is curvlinops' reduce bias block in both modes.
    """
    KFACLinearOperator = pytest.importorskip("curvlinops").KFACLinearOperator
    model, x, y = build("cnn" if name == "conv" else name)
    if name == "conv":  # curvlinops averages grouped inputs: keep the groups=1 convolution
        model = register(nn.Sequential(model[0], model[1], nn.Flatten(), nn.Linear(36, 3)).to(DT))
    _, K = curvop.TorchGGN(model, "classification").kron(x, y, N=6, approx=approx)
    params = list(model.parameters())

    def dense(kfac_approx):
        op = KFACLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), params, [(x, y)],
                                fisher_type="type-2", kfac_approx=kfac_approx,
                                separate_weight_and_bias=True, check_deterministic=False)
        return torch.as_tensor(op @ torch.eye(op.shape[0], dtype=DT))

    theirs, theirs_reduce = dense(approx), dense("reduce")
    ours = K.to_dense()
    starts = [0, *torch.tensor(param_sizes(model)).cumsum(0).tolist()]
    for p, s, e in zip(params, starts[:-1], starts[1:]):
        expected = theirs if p.dim() > 1 else theirs_reduce
        torch.testing.assert_close(ours[s:e, s:e], expected[s:e, s:e], **TOL)


# --- layers without a Kronecker form ----------------------------------------------------------


def _embedding_model(**kw):
    return nn.Sequential(nn.Embedding(10, 4, **kw), nn.Flatten(), nn.Linear(12, 3))


def _circular_model():
    return nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3, padding=1,
                                                              padding_mode="circular"),
                         nn.Flatten(), nn.Linear(32, 3))


UNHANDLED = {
    # name: (model, x, expected pieces of the message)
    "layernorm": (lambda: Case("layernorm_mlp", "classification").build()[0], (16,),
                  ["'1' (LayerNorm; weight, bias)"]),
    "batchnorm": (lambda: Case("batchnorm_mlp", "classification").build()[0], (16,),
                  ["'1' (BatchNorm1d; weight, bias)"]),
    "two_path": (lambda: Case("two_path", "classification").build()[0], (16,),
                 ["the model itself (TwoPath; scale)"]),
    "embedding_max_norm": (lambda: register(_embedding_model(max_norm=100.0).to(DT)), None,
                           ["'0' (Embedding; weight)", "max_norm=100.0"]),
    "embedding_freq": (lambda: register(_embedding_model(scale_grad_by_freq=True).to(DT)), None,
                       ["'0' (Embedding; weight)", "scale_grad_by_freq"]),
    "reused": (lambda: register(Reused().to(DT)), (6,),
               ["'lin' (Linear; weight, bias)", "outside its own forward"]),
    "twice": (lambda: register(Twice().to(DT)), (6,), ["'lin' (Linear; weight, bias)",
                                                        "called 2 times"]),
    "circular": (lambda: register(_circular_model().to(DT)), (16,),
                 ["'1' (Conv2d; weight, bias)", "padding_mode='circular'"]),
}


def _unhandled_case(key):
    factory, shape, pieces = UNHANDLED[key]
    torch.manual_seed(0)
    model = factory()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 10, (5, 3), generator=g) if shape is None else \
        torch.randn(5, *shape, generator=g, dtype=DT)
    y = torch.randint(0, 3, (5,), generator=g)
    return model, x, y, pieces


@pytest.mark.parametrize("key", list(UNHANDLED))
def test_layers_without_kronecker_form_raise_naming_the_module(key):
    model, x, y, pieces = _unhandled_case(key)
    for cls in (curvop.TorchGGN, curvop.TorchEF):
        with pytest.raises(NotSupportedError) as err:
            cls(model, "classification").kron(x, y, N=5)
        msg = str(err.value)
        assert all(p in msg for p in pieces), msg
        assert "fallback='diag'" in msg and "fallback='full'" in msg and ".diag" in msg


@pytest.mark.parametrize("key", ["layernorm", "two_path", "reused", "twice"])
def test_fallbacks_are_the_exact_diagonal_and_dense_blocks(key):
    model, x, y, _ = _unhandled_case(key)
    G = ref.ggn(model, x, y, "classification")
    E = ref.ef(model, x, y, "classification")
    sizes = param_sizes(model)
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    handled = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    handled_ids = {id(p) for m in handled for p in m.parameters(recurse=False)}
    if key in ("reused", "twice"):
        handled_ids -= {id(p) for p in model.lin.parameters()}
    params = ref.selected_params(model, False)
    for cls, H in ((curvop.TorchGGN, G), (curvop.TorchEF, E)):
        iface = cls(model, "classification")
        Kd = iface.kron(x, y, N=5, fallback="diag")[1]
        Kf = iface.kron(x, y, N=5, fallback="full")[1]
        assert Kd.block_sizes == Kf.block_sizes == tuple(sizes)
        for i, (p, s, e) in enumerate(zip(params, starts[:-1], starts[1:])):
            if id(p) in handled_ids:  # the same Kronecker factors either way
                for F, F2 in zip(Kd.kfacs[i], Kf.kfacs[i]):
                    assert torch.equal(F, F2)
                continue
            torch.testing.assert_close(Kd.kfacs[i][0], torch.diag(H[s:e, s:e].diagonal()), **TOL)
            torch.testing.assert_close(Kf.kfacs[i][0], H[s:e, s:e], **TOL)


# --- selections and options ---------------------------------------------------------------


def test_subnetwork_of_whole_tensors_is_those_blocks_and_a_split_tensor_raises():
    model, x, y = Case("tanh_mlp", "classification").build()
    sizes = param_sizes(model)
    start = sum(sizes[:2])
    idx = torch.arange(start, start + sizes[2] + sizes[3])  # the second Linear, weight and bias
    full = curvop.TorchGGN(model, "classification").kron(x, y, N=6)[1].kfacs
    sub = curvop.TorchGGN(model, "classification", subnetwork_indices=idx).kron(x, y, N=6)[1]
    assert_kfacs(sub.kfacs, full[2:4])
    for bad in (idx[:-1], idx.flip(0)):
        with pytest.raises(NotSupportedError, match="subnetwork"):
            curvop.TorchGGN(model, "classification", subnetwork_indices=bad).kron(x, y, N=6)


def test_options_are_validated():
    model, x, y = Case("tanh_mlp", "classification").build()
    iface = curvop.TorchGGN(model, "classification")
    with pytest.raises(InputError, match="`approx` must be 'expand' or 'reduce'; got 'mean'"):
        iface.kron(x, y, N=6, approx="mean")
    with pytest.raises(InputError, match="`fallback`"):
        iface.kron(x, y, N=6, fallback="dense")
    with pytest.raises(InputTypeError, match="`fallback`"):
        iface.kron(x, y, N=6, fallback=True)
    with pytest.raises(InputTypeError, match="unexpected keyword arguments \\['damping'\\]"):
        curvop.TorchEF(model, "classification").kron(x, y, N=6, damping=1.0)
    with pytest.raises(InputError, match="`N`"):
        iface.kron(x, y, N=0)


def test_invalid_options_leave_the_mc_generator_alone():
    model, x, y = Case("tanh_mlp", "classification").build()
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    iface = curvop.TorchGGN(model, "classification", stochastic=True, generator=gen)
    with pytest.raises(InputError):
        iface.kron(x, y, N=6, approx="mean")
    assert torch.equal(gen.get_state(), state)


def test_kron_result_is_symmetric_psd_on_the_models_dtype():
    model, x, y = build("cnn")
    _, K = curvop.TorchGGN(model, "classification").kron(x, y, N=6)
    D = K.to_dense()
    assert D.dtype == DT and torch.equal(D, D.T)
    assert torch.linalg.eigvalsh(D).min() > -1e-12


def test_conv_factor_conventions_of_the_three_backends():
    """Conv2d Kron of curvop's native, ASDL and BackPACK backends, as documented in curvop.kfac.

    Native ``expand`` is the reference; ASDL has the same weight blocks but the weight's output
    factor as its bias block; BackPACK has the ``reduce`` output side, ``T`` times the
    ``expand`` input side and the exact bias block. Linear layers agree everywhere.
    """
    pytest.importorskip("asdl")
    pytest.importorskip("backpack")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(3 * 5 * 5, 4)).to(DT)
    x, y = torch.randn(6, 2, 5, 5, dtype=DT), torch.randint(0, 4, (6,))
    T = 25  # positions of the 5 x 5 output
    kron = {name: getattr(curvop, name)(net, "classification").kron(x, y, N=6)[1].kfacs
            for name in ("TorchGGN", "AsdlGGN", "BackPackGGN")}
    exp = kron["TorchGGN"]
    red = curvop.TorchGGN(net, "classification").kron(x, y, N=6, approx="reduce")[1].kfacs
    asdl, bp = kron["AsdlGGN"], kron["BackPackGGN"]
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(asdl[0][0], exp[0][0], **close)
    torch.testing.assert_close(asdl[0][1], exp[0][1], **close)
    torch.testing.assert_close(asdl[1][0], exp[0][0], **close)  # bias: positions as data
    assert not torch.allclose(asdl[1][0], exp[1][0], rtol=0.1)  # ... not the exact block
    torch.testing.assert_close(bp[0][0], red[0][0], **close)
    torch.testing.assert_close(bp[0][1], T * exp[0][1], **close)
    torch.testing.assert_close(bp[1][0], exp[1][0], **close)  # exact bias block
    for other in (asdl, bp):
        for block, ref_block in zip(other[2:], exp[2:]):
            for F, R in zip(block, ref_block):
                torch.testing.assert_close(F, R, **close)


# --- nn.Embedding ---------------------------------------------------------------------------


class EmbSeq(nn.Module):
    """Embedding over 5 tokens (weight sharing) → tanh → flattened head."""

    def __init__(self, padding_idx=None, V=9, D=4, T=5, C=3):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.head = nn.Linear(T * D, C)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).flatten(1))


def embedding_pairs(model, x, S):
    """Brute-force ``a`` (one-hot, zero rows at padding) `(n, T, V)` and ``g`` `(K, n, T, D)`.

    The padding convention is checked against autograd: per sample and column,
    ``Σ_t a_t g_tᵀ`` must be the per-sample gradient of the `(V, D)` weight.
    """
    emb = model.emb
    out = {}
    h = emb.register_forward_hook(lambda m, i, o: out.update(o=o))
    try:
        f = model(x)
    finally:
        h.remove()
    K = S.shape[-1]
    g = torch.stack([torch.autograd.grad(f, out["o"], S[:, :, k], retain_graph=True)[0]
                     for k in range(K)])
    a = nn.functional.one_hot(x, emb.num_embeddings).to(DT)
    if emb.padding_idx is not None:
        a[..., emb.padding_idx] = 0
    for n in range(x.shape[0]):
        fn = model(x[n:n + 1])
        for k in range(K):
            gw = torch.autograd.grad(fn, emb.weight, S[n:n + 1, :, k], retain_graph=True)[0]
            torch.testing.assert_close(torch.einsum("tv,td->vd", a[n], g[k, n]), gw, **TOL)
    return a, g


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_embedding_factors_equal_brute_force(approx, padding_idx):
    """The (V, D) weight is [input side (V, V), output side (D, D)]; the head as before."""
    torch.manual_seed(0)
    model = register(EmbSeq(padding_idx).to(DT))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 9, (6, 5), generator=g)
    x[0, :2] = 2  # the padding token, when there is one
    y = torch.randint(0, 3, (6,), generator=g)
    N = 10
    _, K = curvop.TorchGGN(model, "classification").kron(x, y, N=N, approx=approx)
    S = sqrt_lambda(model(x), "classification")
    a, gr = embedding_pairs(model, x, S)
    T = x.shape[1]
    if approx == "expand":
        A = torch.einsum("kntd,knte->de", gr, gr)
        B = torch.einsum("ntv,ntw->vw", a, a) / (N * T)
    else:
        gs, am = gr.sum(2), a.mean(1)
        A = torch.einsum("knd,kne->de", gs, gs)
        B = torch.einsum("nv,nw->vw", am, am) / N
    assert K.layout == (2, 2, 1)
    assert_kfacs(K.kfacs, [[B, A], *brute_kfacs(model, x, S, N, approx)])
    if padding_idx is not None:
        assert K.kfacs[0][0][padding_idx].abs().max() == 0  # the padding row is never updated


@pytest.mark.parametrize("token", [3, 2])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_one_datum_one_token_is_the_dense_block(padding_idx, token):
    """One datum of one token (no weight sharing), N = 1: KFAC is exact, also for the
    row-major (V, D) layout of the weight; the padding token's block is zero."""
    torch.manual_seed(0)
    model = register(EmbSeq(padding_idx, T=1).to(DT))
    x, y = torch.tensor([[token]]), torch.tensor([1])
    sizes = param_sizes(model)
    G = ref.ggn(model, x, y, "classification")
    for cls, curv in ((curvop.TorchGGN, G), (curvop.TorchEF, ref.ef(model, x, y,
                                                                   "classification"))):
        for approx in ("expand", "reduce"):
            _, K = cls(model, "classification").kron(x, y, N=1, approx=approx)
            assert K.block_sizes == tuple(sizes)
            torch.testing.assert_close(K.to_dense(), diag_blocks(curv, sizes), **TOL)
    assert bool(G[:36, :36].abs().max() == 0) is (token == padding_idx)


class TinyTransformer(nn.Module):
    def __init__(self, V=11, D=8, C=3, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.enc = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


def test_tiny_transformer_factors_the_embedding_as_a_kron_block():
    """kron(fallback='diag'): the embedding is [(V, V), (D, D)], only LayerNorms fall back;
    one datum of identical tokens with 'reduce' makes the embedding block exact."""
    torch.manual_seed(0)
    model = register(TinyTransformer(padding_idx=0).to(DT).eval())
    x, y = torch.tensor([[4, 4, 4]]), torch.tensor([2])
    iface = curvop.TorchGGN(model, "classification")
    with pytest.raises(NotSupportedError) as err:
        iface.kron(x, y, N=1)
    assert "LayerNorm" in str(err.value) and "Embedding" not in str(err.value)
    _, K = iface.kron(x, y, N=1, approx="reduce", fallback="diag")
    assert [F.shape for F in K.kfacs[0]] == [(11, 11), (8, 8)]
    G = iface.full(x, y)[1]
    torch.testing.assert_close(K.kfacs[0][0].kron(K.kfacs[0][1]), G[:88, :88], **TOL)
    names = [n for n, _ in model.named_parameters()]
    sizes = param_sizes(model)
    starts = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    block_at = {s: j for j, s in enumerate([0, *torch.tensor(K.block_sizes).cumsum(0).tolist()])}
    norms = [(s, e) for n, s, e in zip(names, starts[:-1], starts[1:]) if "norm" in n]
    assert len(norms) == 4
    for s, e in norms:  # the diagonal fallback
        torch.testing.assert_close(K.kfacs[block_at[s]][0], torch.diag(G[s:e, s:e].diagonal()),
                                   **TOL)
    # a batch of several sequences: the embedding is still a Kron block, and the factors are
    # the brute-force ones
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 11, (4, 5), generator=g)
    y = torch.randint(0, 3, (4,), generator=g)
    _, K = iface.kron(x, y, N=4, fallback="diag")
    S = sqrt_lambda(model(x), "classification")
    a, gr = embedding_pairs(model, x, S)
    torch.testing.assert_close(K.kfacs[0][0], torch.einsum("ntv,ntw->vw", a, a) / 20, **TOL)
    torch.testing.assert_close(K.kfacs[0][1], torch.einsum("kntd,knte->de", gr, gr), **TOL)
    # the diagonal is still exact on this model
    torch.testing.assert_close(iface.diag(x, y)[1], ref.ggn(model, x, y, "classification")
                               .diagonal(), rtol=1e-10, atol=1e-12)


# --- one forward pass: the outputs from the tapped forward ----------------------------------


def _counted_kron(iface, model, x, y, **kwargs):
    before = len(model.counter)
    loss, K = iface.kron(x, y, N=9, **kwargs)
    return loss, K, len(model.counter) - before


@pytest.mark.parametrize("name, likelihood, cls, options", [
    ("mlp", "classification", curvop.TorchGGN, {}),
    ("cnn", "regression", curvop.TorchGGN, {}),
    ("seq", "classification", curvop.TorchEF, {}),
    ("mlp", "classification", curvop.TorchGGN, {"stochastic": True, "num_samples": 3}),
])
def test_repeated_kron_runs_one_forward_with_the_same_result(name, likelihood, cls, options):
    """The first call of a structure runs the forward without graph, the one-sample sizing pass
    and the tapped pass; later calls whose batch fits in one chunk take the outputs, the loss
    and S from the tapped pass alone, with results equal to the two-forward route."""
    inner, x, y = build(name, likelihood)
    model = Counted(inner)

    def iface():
        gen = {"generator": torch.Generator().manual_seed(4)} if options else {}
        return cls(model, likelihood, **options, **gen)

    loss1, K1, n1 = _counted_kron(iface(), model, x, y)
    loss2, K2, n2 = _counted_kron(iface(), model, x, y)
    assert (n1, n2) == (3, 1)
    assert torch.equal(loss1, loss2)
    assert_kfacs(K2.kfacs, K1.kfacs)
    if options:  # the same draws: the sampled S comes from the same generator state
        assert all(torch.equal(a, b) for ka, kb in zip(K1.kfacs, K2.kfacs)
                   for a, b in zip(ka, kb))
    # a batch over the memory budget is chunked, so its outputs come first, as before
    chunked = cls(model, likelihood, memory_budget=1, **options,
                  **({"generator": torch.Generator().manual_seed(4)} if options else {}))
    loss3, K3, n3 = _counted_kron(chunked, model, x, y)
    assert n3 == 1 + x.shape[0]
    assert torch.equal(loss3, loss1)
    assert_kfacs(K3.kfacs, K1.kfacs)


def test_one_forward_kron_checks_targets_and_leaves_the_model_alone():
    inner, x, y = build("mlp")
    model = Counted(inner)
    register(model)
    iface = curvop.TorchGGN(model, "classification")
    iface.kron(x, y, N=9)
    with pytest.raises(InputError, match="`y`"):
        iface.kron(x, y + 3, N=9)  # labels out of range, found after the tapped forward
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    _, K, n = _counted_kron(iface, model, x, y)
    assert n == 1
    assert_kfacs(K.kfacs, curvop.TorchGGN(inner, "classification").kron(x, y, N=9)[1].kfacs)


def test_one_forward_kron_with_token_outputs_and_last_layer():
    """Token-level outputs are flattened after the tapped forward as after the plain one."""
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x = torch.randint(0, 7, (4, 6))
    y = torch.randint(0, 3, (4, 6))
    y[0, :2] = -100
    model = Counted(emb)
    register(model)
    for kwargs in ({}, {"last_layer": True}):
        iface = curvop.TorchGGN(model, "classification", **kwargs)
        loss1, K1, _ = _counted_kron(iface, model, x, y)
        loss2, K2, n2 = _counted_kron(iface, model, x, y)
        assert n2 == 1
        assert torch.equal(loss1, loss2)
        assert_kfacs(K2.kfacs, K1.kfacs)
