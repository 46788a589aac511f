"""BackPACK backend specifics: statelessness, cleanliness, Kronecker factors, MC seeding, limits.

The conformance and invariant files test BackPackGGN/BackPackEF against the references through
the registry; this file tests what only this backend has.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvop.curvature import TorchEF, TorchGGN
from curvop.errors import NotSupportedError

import reference as ref
from cases import Case, assert_untouched, register, snapshot

bp = pytest.importorskip("backpack")  # an optional extra: the registry has no entry without it
from backpack.context import CTX  # noqa: E402

from curvop.curvature.backpack import BackPackEF, BackPackGGN  # noqa: E402

METHODS = ["jacobians", "gradients", "full", "diag", "kron", "last_layer_jacobians", "boom"]


def _de_bruijn_pairs(n: int) -> list[int]:
    """A sequence over ``range(n)`` holding every ordered pair (repeats too) as neighbours."""
    seq, a = [], [0] * (2 * n)

    def db(t: int, p: int) -> None:
        if t > 2:
            if 2 % p == 0:
                seq.extend(a[1 : p + 1])
        else:
            a[t] = a[t - p]
            db(t + 1, p)
            for j in range(a[t - p] + 1, n):
                a[t] = j
                db(t + 1, t)

    db(1, 1)
    return seq + seq[:1]


def _backpack_global_state() -> tuple:
    return (len(CTX.hook_handles), CTX.get_active_exts(), CTX.get_retain_graph(),
            torch.get_default_dtype())


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_every_method_in_every_order_on_one_object(kind):
    """Every ordered pair of calls, a failing one included: same results, untouched model."""
    model, x, y = Case("tanh_mlp", "classification").build()
    armed = {"on": False}

    def tripwire(module, inputs, output):  # the user's own hook, raising on demand
        if armed["on"]:
            raise _Boom("boom")

    model[4].register_forward_hook(tripwire)
    register(model)  # snapshot with the user's hook in place
    cls, torch_cls = (BackPackGGN, TorchGGN) if kind == "ggn" else (BackPackEF, TorchEF)
    iface, native = cls(model, "classification"), torch_cls(model, "classification")
    expected = {
        "jacobians": native.jacobians(x),
        "gradients": native.gradients(x, y),
        "full": native.full(x, y),
        "diag": native.diag(x, y),
        "last_layer_jacobians": native.last_layer_jacobians(x),
        "kron": (None, torch.block_diag(*[  # one datum: KFLR is exact per layer
            B for B in _blocks(ref.ggn(model, x[:1], y[:1], "classification"), model)])),
    }
    before, state = snapshot(model), _backpack_global_state()
    for step in _de_bruijn_pairs(len(METHODS)):
        method = METHODS[step]
        if method == "boom":
            armed["on"] = True
            with pytest.raises(_Boom):
                iface.diag(x, y)  # fails in the forward, after BackPACK extended the layers
            armed["on"] = False
        elif method == "kron" and kind == "ef":
            with pytest.raises(NotSupportedError, match="none of the empirical Fisher"):
                iface.kron(x, y, N=6)
        elif method == "kron":
            _, K = iface.kron(x[:1], y[:1], N=1)
            torch.testing.assert_close(K.to_dense(), expected["kron"][1], rtol=1e-10, atol=1e-12)
        else:
            args = (x,) if "jacobians" in method else (x, y)
            for got, want in zip(getattr(iface, method)(*args), expected[method]):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert_untouched(model, before)
        assert _backpack_global_state() == state
        assert not any(hasattr(m, "_backpack_extend") for m in model.modules())


def _blocks(H: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    out, start = [], 0
    for p in model.parameters():
        out.append(H[start : start + p.numel(), start : start + p.numel()])
        start += p.numel()
    return out


@pytest.mark.parametrize("cls", [BackPackGGN, BackPackEF])
def test_full_operator_is_the_shared_matrix_free_operator(cls):
    model, x, y = Case("cnn", "regression").build()
    iface = cls(model, "regression", subnetwork_indices=torch.arange(0, 55, 3))
    torch.testing.assert_close(iface.full_operator(x, y)[1].to_dense(), iface.full(x, y)[1])


def test_chunks_of_samples_add_up():
    """A tiny memory budget runs BackPACK one sample at a time: the same numbers."""
    model, x, y = Case("cnn", "classification").build()
    for cls in (BackPackGGN, BackPackEF):
        big, small = cls(model, "classification"), cls(model, "classification", memory_budget=1)
        for method in ("full", "diag"):
            torch.testing.assert_close(getattr(small, method)(x, y)[1],
                                       getattr(big, method)(x, y)[1], rtol=1e-10, atol=1e-12)
    big, small = BackPackGGN(model, "classification"), BackPackGGN(model, "classification",
                                                                   memory_budget=1)
    for F_small, F_big in zip(sum(small.kron(x, y, N=6)[1].kfacs, []),
                              sum(big.kron(x, y, N=6)[1].kfacs, [])):
        torch.testing.assert_close(F_small, F_big, rtol=1e-10, atol=1e-12)


def test_stale_flag_and_user_extension_are_respected():
    """A stale ``_backpack_extend`` (BackPACK's hook removal leaves it) must not silence us;
    a model the user extended keeps its hooks and is not counted twice."""
    model, x, y = Case("tanh_mlp", "regression").build()
    want = TorchGGN(model, "regression").diag(x, y)[1]
    want_ef = TorchEF(model, "regression").diag(x, y)[1]
    for m in model.modules():
        m._backpack_extend = True  # what laplace-torch / CTX.remove_hooks() leave behind
    register(model)
    torch.testing.assert_close(BackPackGGN(model, "regression").diag(x, y)[1], want)
    assert all(m._backpack_extend for m in model.modules())
    for m in model.modules():
        del m._backpack_extend
    n_before = len(CTX.hook_handles)
    bp.extend(model)
    user_handles = CTX.hook_handles[n_before:]
    register(model)
    try:
        torch.testing.assert_close(BackPackGGN(model, "regression").diag(x, y)[1], want)
        torch.testing.assert_close(BackPackEF(model, "regression").diag(x, y)[1], want_ef)
        assert CTX.hook_handles[n_before:] == user_handles
    finally:
        for h in user_handles:
            h.remove()
        CTX.hook_handles = CTX.hook_handles[:n_before]
        for m in model.modules():
            vars(m).pop("_backpack_extend", None)
        register(model)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kron_scaling_and_accumulation(likelihood):
    model, x, y = Case("tanh_mlp", likelihood).build()
    iface = BackPackGGN(model, likelihood)
    _, K = iface.kron(x, y, N=6)
    _, K12 = iface.kron(x, y, N=12)
    for (A, *B), (A2, *B2) in zip(K.kfacs, K12.kfacs):
        torch.testing.assert_close(A2, A)  # N scales the input side of weights only
        for Bi, B2i in zip(B, B2):
            torch.testing.assert_close(B2i, Bi / 2)
    # mini-batches of a data set of N = 6 accumulate factor-wise into the full-batch factors
    acc = iface.kron(x[:2], y[:2], N=6)[1].accumulate(iface.kron(x[2:], y[2:], N=6)[1])
    for F_acc, F_full in zip(sum(acc.kfacs, []), sum(K.kfacs, [])):
        torch.testing.assert_close(F_acc, F_full, rtol=1e-10, atol=1e-12)
    # with one datum KFLR is the exact GGN block per layer (factor 1/2 and MSE's 2 included)
    H1 = ref.ggn(model, x[:1], y[:1], likelihood)
    torch.testing.assert_close(iface.kron(x[:1], y[:1], N=1)[1].to_dense(),
                               torch.block_diag(*_blocks(H1, model)), rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore::UserWarning")  # laplace-torch's own hook warnings
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kron_and_diag_blocks_equal_laplace_torch(likelihood):
    """laplace-torch 0.3's BackPACK backend is the convention (run on a copy: it extends the
    model it is given for good)."""
    lap = pytest.importorskip("laplace.curvature")
    model, x, y = Case("tanh_mlp", likelihood).build()
    n_handles = len(CTX.hook_handles)
    try:
        theirs = lap.BackPackGGN(copy.deepcopy(model), likelihood)
        loss_l, K_l = theirs.kron(x, y, N=20)
        h_l = theirs.diag(x, y)[1]
    finally:  # laplace-torch leaves its hooks in BackPACK's global list
        for h in CTX.hook_handles[n_handles:]:
            h.remove()
        CTX.hook_handles = CTX.hook_handles[:n_handles]
    loss, K = BackPackGGN(model, likelihood).kron(x, y, N=20)
    torch.testing.assert_close(loss, loss_l)
    dense_l = torch.block_diag(*[torch.kron(*F) if len(F) == 2 else F[0] for F in K_l.kfacs])
    torch.testing.assert_close(K.to_dense(), dense_l, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(BackPackGGN(model, likelihood).diag(x, y)[1], h_l,
                               rtol=1e-10, atol=1e-12)


def test_kron_selections_and_limits():
    model, x, y = Case("tanh_mlp", "classification").build()
    last = BackPackGGN(model, "classification", last_layer=True).kron(x, y, N=6)[1]
    P = sum(p.numel() for p in model.parameters())
    whole = torch.arange(P - last.shape[0], P)  # the last layer's tensors, whole and in order
    sub = BackPackGGN(model, "classification", subnetwork_indices=whole).kron(x, y, N=6)[1]
    torch.testing.assert_close(sub.to_dense(), last.to_dense())
    partial = BackPackGGN(model, "classification", subnetwork_indices=whole[1:])
    with pytest.raises(NotSupportedError, match="whole parameter tensors"):
        partial.kron(x, y, N=6)
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        BackPackGGN(model, "classification").kron(x, y, N=6, damping=1.0)
    bn, xb, yb = Case("batchnorm_mlp", "classification").build()
    with pytest.raises(NotSupportedError, match=r"module '1' \(BatchNorm1d\).*KFLR"):
        BackPackGGN(bn, "classification").kron(xb, yb, N=6)
    # the cnn's second convolution sees a 1x1 output: its KFLR block is exact for one datum
    cnn, xc, yc = Case("cnn", "regression").build()
    K = BackPackGGN(cnn, "regression").kron(xc[:1], yc[:1], N=1)[1].to_dense()
    H = ref.ggn(cnn, xc[:1], yc[:1], "regression")
    n_first = cnn[1].weight.numel() + cnn[1].bias.numel()
    torch.testing.assert_close(K[n_first:, n_first:], torch.block_diag(
        *_blocks(H, cnn)[2:]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_mc_is_seeded_by_the_generator_and_leaves_global_rng_alone(likelihood):
    model, x, y = Case("tanh_mlp", likelihood, batch=4).build()

    def mc(seed, n=2):
        return BackPackGGN(model, likelihood, stochastic=True, num_samples=n,
                           generator=torch.Generator().manual_seed(seed))

    rng = torch.get_rng_state()
    a, b = mc(3), mc(3)
    for method in ("diag", "full"):
        torch.testing.assert_close(getattr(a, method)(x, y)[1], getattr(b, method)(x, y)[1],
                                   rtol=0, atol=0)
    Ka, Kb = a.kron(x, y, N=4)[1], b.kron(x, y, N=4)[1]
    torch.testing.assert_close(Ka.to_dense(), Kb.to_dense(), rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), rng)
    # the same draws drive DiagGGNMC and SqrtGGNMC: diag is the diagonal of full
    torch.testing.assert_close(mc(5).diag(x, y)[1], mc(5).full(x, y)[1].diagonal())
    assert not torch.equal(mc(3).diag(x, y)[1], mc(4).diag(x, y)[1])
    first, second = mc(3).diag(x, y)[1], a.diag(x, y)[1]  # a's generator has moved on
    assert not torch.equal(first, second)
    exact = BackPackGGN(model, likelihood).full(x, y)[1]
    err = (mc(0, 4000).full(x, y)[1] - exact).norm() / exact.norm()
    assert err < 0.1, err  # ~4000^-1/2 relative error; unbiased (no factor of C or 2)


def test_matches_native_backend_on_mnist_mlp():
    """784-256-256-10: BackPACK against the native Jacobians (and diagonal), everything else
    derived from them exactly: Λ's square root, per-sample gradients J_nᵀ(p − e_y)."""
    torch.manual_seed(0)
    net = register(nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 10)).double())
    x, y = torch.randn(3, 784, dtype=torch.float64), torch.tensor([1, 7, 3])
    tol = {"rtol": 1e-10, "atol": 1e-12}
    Js, f = TorchGGN(net, "classification").jacobians(x)  # (B, P, C)
    p = torch.softmax(f, -1)
    S = (torch.eye(10, dtype=f.dtype) - p.unsqueeze(-1)) * p.sqrt().unsqueeze(-2)  # Λ = S Sᵀ
    SJ = torch.einsum("bpc,bck->bkp", Js, S)
    G = torch.einsum("bpc,bc->bp", Js, p - F.one_hot(y, 10).double())
    ggn, ef = BackPackGGN(net, "classification"), BackPackEF(net, "classification")
    torch.testing.assert_close(ggn.jacobians(x)[0], Js, **tol)
    torch.testing.assert_close(ggn.diag(x, y)[1], SJ.square().sum((0, 1)), **tol)
    torch.testing.assert_close(ggn.diag(x, y)[1], TorchGGN(net, "classification").diag(x, y)[1],
                               **tol)
    torch.testing.assert_close(ef.gradients(x, y)[1], G, **tol)
    torch.testing.assert_close(ef.diag(x, y)[1], G.square().sum(0), **tol)
    idx = torch.randperm(Js.shape[1])[:300]
    M = SJ[..., idx].reshape(-1, 300)
    torch.testing.assert_close(BackPackGGN(net, "classification", subnetwork_indices=idx).full(
        x, y)[1], M.T @ M, **tol)
    torch.testing.assert_close(BackPackEF(net, "classification", subnetwork_indices=idx).full(
        x, y)[1], G[:, idx].T @ G[:, idx], **tol)
    J_last = Js[:, -2570:]  # regression: Λ = I
    torch.testing.assert_close(BackPackGGN(net, "regression", last_layer=True).full(
        x, torch.zeros(3, 10).double())[1], torch.einsum("bpc,bqc->pq", J_last, J_last), **tol)
    # one datum: the KFLR blocks are the exact GGN blocks, so their diagonals agree
    _, K = ggn.kron(x[:1], y[:1], N=1)
    torch.testing.assert_close(K.diagonal(), SJ[0].square().sum(0), **tol)


def test_frozen_prefix_runs_without_backpack():
    """Layers before the first trainable one may be anything, even for second-order methods."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    for p in [*net[0].parameters(), *net[1].parameters()]:
        p.requires_grad_(False)
    register(net)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    for method in ("diag", "full"):
        torch.testing.assert_close(getattr(BackPackGGN(net, "classification"), method)(x, y)[1],
                                   getattr(TorchGGN(net, "classification"), method)(x, y)[1])


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(F.linear(torch.tanh(self.lin(x)), self.lin.weight))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.lin(torch.tanh(self.lin(x))))


def test_what_backpack_cannot_do_is_a_clear_error():
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    ln, xl, yl = Case("layernorm_mlp", "classification").build()
    calls = []
    ln.register_forward_hook(lambda *a: calls.append(1))
    register(ln)
    for cls, method in ((BackPackGGN, "diag"), (BackPackEF, "diag"), (BackPackGGN, "gradients")):
        calls.clear()
        with pytest.raises(NotSupportedError, match=r"module '1' \(LayerNorm\).*use TorchGGN"):
            getattr(cls(ln, "classification"), method)(xl, yl)
        assert len(calls) == 1  # the interface's validating forward only: nothing ran after it
    tp, xt, yt = Case("two_path", "classification").build()
    with pytest.raises(NotSupportedError, match=r"\(TwoPath\): it is a custom module"):
        BackPackGGN(tp, "classification").full(xt, yt)
    tied = register(_Tied().double())
    with pytest.raises(NotSupportedError, match="'lin.weight' do not add up.*weight tying"):
        BackPackEF(tied, "classification").gradients(x, y)
    twice = register(_Twice().double())
    with pytest.raises(NotSupportedError, match=r"'lin' \(Linear\): it is called 2 times"):
        BackPackEF(twice, "classification").diag(x, y)
    inplace = register(nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True),
                                     nn.Linear(3, 2)).double())
    with pytest.raises(NotSupportedError, match=r"'1' \(ReLU\): it works in place"):
        BackPackGGN(inplace, "classification").diag(x, y)
    with pytest.raises(NotSupportedError, match="in-place operation conflicts"):
        BackPackGGN(inplace, "classification").jacobians(x)
    assert _backpack_global_state()[0] == len(CTX.hook_handles)


class _AddInPlace(nn.Module):
    """A Linear's output changed in place (``h += 1``), which BackPACK's hooks forbid."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        h += 1.0
        return self.b(torch.tanh(h))


def test_in_place_operations_raise_naming_the_culprit():
    """First-order extensions meet in-place operations only at run time: a clear error."""
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    relu = register(nn.Sequential(nn.Linear(4, 3), nn.ReLU(inplace=True),
                                  nn.Linear(3, 2)).double())
    add = register(_AddInPlace().double())
    for model, culprit in ((relu, r"modules working in place: \['1'\] \(set inplace=False\)"),
                           (add, r"an in-place tensor operation in forward")):
        for cls, method, args in ((BackPackGGN, "jacobians", (x,)),
                                  (BackPackEF, "gradients", (x, y)),
                                  (BackPackEF, "diag", (x, y))):
            with pytest.raises(NotSupportedError,
                               match=rf"in-place operation conflicts.*{culprit}.*use TorchGGN"):
                getattr(cls(model, "classification"), method)(*args)
