"""Transformers and RNNs out of the box, token-level outputs, and attention Kronecker factors.

Truth is dense float64 brute force written here by autograd loops (per-sample Jacobians and
gradients, Hessian rows by double backward, HVPs), on tiny models: 2-layer encoder and decoder
(d=8, 2 heads, 3-4 tokens), cross-attention with ``nn.MultiheadAttention``, a hand-written
attention through ``F.scaled_dot_product_attention`` and an LSTM. References run with torch's
math attention and the MHA fast path off (the fused kernels have no double backward) — set here
with torch's own switches, independently of curvop.

Train mode: active dropout (``p > 0``) makes every forward a different random function, so
curvop raises a NotSupportedError naming the modules (``model.eval()`` or ``p = 0`` is the fix);
train mode with ``p = 0`` gives the eval-mode numbers.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvop
from curvop.errors import InputError, NotSupportedError
from curvop.likelihoods import TokenClassification

import reference as ref
from cases import register

DT = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-10}
D, HEADS, FF = 8, 2, 8
KINDS = {"ggn": curvop.TorchGGN, "ef": curvop.TorchEF, "hessian": curvop.TorchHessian}


# --- global kernel settings -----------------------------------------------------------------


def settings() -> dict:
    """The global switches curvop may touch, read through torch's public API."""
    b = torch.backends
    return {"fastpath": b.mha.get_fastpath_enabled(), "flash": b.cuda.flash_sdp_enabled(),
            "mem_efficient": b.cuda.mem_efficient_sdp_enabled(),
            "math": b.cuda.math_sdp_enabled(), "cudnn_sdp": b.cuda.cudnn_sdp_enabled(),
            "cudnn": b.cudnn.enabled}


@pytest.fixture(autouse=True)
def settings_unchanged():
    before = settings()
    yield
    assert settings() == before, "curvop changed the global kernel settings"


@contextlib.contextmanager
def reference_kernels():
    """Math attention and no fast path for the brute-force references (restored on exit)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            torch.backends.mha.set_fastpath_enabled(False)
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


@contextlib.contextmanager
def user_settings(**values):
    """Non-default user settings for one test, restored afterwards."""
    b = torch.backends
    setters = {"fastpath": b.mha.set_fastpath_enabled, "flash": b.cuda.enable_flash_sdp,
               "math": b.cuda.enable_math_sdp, "mem_efficient": b.cuda.enable_mem_efficient_sdp,
               "cudnn": lambda v: setattr(b.cudnn, "enabled", v)}
    before = settings()
    try:
        for k, v in values.items():
            setters[k](v)
        yield
    finally:
        for k in values:
            setters[k](before[k])


# --- models ----------------------------------------------------------------------------------


class Encoder(nn.Module):
    """(B, 12) → 3 tokens of 4 → Linear → 2-layer TransformerEncoder → mean → head."""

    def __init__(self, C: int, dropout: float = 0.1):
        super().__init__()
        self.inp = nn.Linear(4, D)
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=dropout, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.enc(self.inp(x.reshape(x.shape[0], 3, 4))).mean(1))


class Decoder(nn.Module):
    """(B, 12) → 4 tokens of 3; causal decoder over tokens 0-1 attending to tokens 1-3."""

    def __init__(self, C: int, dropout: float = 0.1):
        super().__init__()
        self.inp = nn.Linear(3, D)
        layer = nn.TransformerDecoderLayer(D, HEADS, FF, dropout=dropout, batch_first=True)
        self.dec = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = self.inp(x.reshape(x.shape[0], 4, 3))
        mask = nn.Transformer.generate_square_subsequent_mask(2, dtype=h.dtype)
        return self.head(self.dec(h[:, :2], h[:, 1:], tgt_mask=mask, tgt_is_causal=True).mean(1))


class Attention(nn.Module):
    """One ``nn.MultiheadAttention``: self-attention over 3 tokens, or cross-attention of the
    first ``T_q`` tokens to the other ``4 - T_q``."""

    def __init__(self, C: int, cross: int = 0, dropout: float = 0.1):
        super().__init__()
        self.cross = cross
        self.inp = nn.Linear(3, D)
        self.mha = nn.MultiheadAttention(D, HEADS, dropout=dropout, batch_first=True)
        self.head = nn.Linear(D, C)

    def tokens(self, x):
        h = torch.tanh(self.inp(x.reshape(x.shape[0], 4, 3)))
        if self.cross:
            return h[:, :self.cross], h[:, self.cross:]
        return h[:, :3], h[:, :3]

    def forward(self, x):
        q, kv = self.tokens(x)
        return self.head(self.mha(q, kv, kv)[0].mean(1))


class SDPA(nn.Module):
    """Hand-written causal attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, C: int):
        super().__init__()
        self.inp = nn.Linear(4, D)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        h = torch.tanh(self.inp(x.reshape(x.shape[0], 3, 4)))
        heads = [t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in
                 (self.q(h), self.k(h), self.v(h))]
        a = F.scaled_dot_product_attention(*heads, is_causal=True)
        return self.head(a.transpose(1, 2).flatten(2).mean(1))


class LSTMNet(nn.Module):
    def __init__(self, C: int, tokens: bool = False):
        super().__init__()
        self.tokens = tokens
        self.rnn = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, C)

    def forward(self, x):
        out, _ = self.rnn(x.reshape(x.shape[0], 3, 4))
        return self.head(out if self.tokens else out[:, -1])


class Tagger(nn.Module):
    """Token ids `(B, T)` → `(B, T, C)`; id 0 is padding, masked out as attention keys."""

    def __init__(self, C: int, dropout: float = 0.1):
        super().__init__()
        self.emb = nn.Embedding(7, D)
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=dropout, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)  # nested tensors would be its fast path
        self.head = nn.Linear(D, C)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids), src_key_padding_mask=ids == 0))


#: name -> (factory(C), likelihood, inputs of a batch of 4)
MODELS = {
    "encoder": (Encoder, "classification"),
    "decoder": (Decoder, "regression"),
    "cross_mha": (lambda C, **kw: Attention(C, cross=1, **kw), "classification"),
    "sdpa": (SDPA, "regression"),
    "lstm": (LSTMNet, "classification"),
}


def build(name: str, mode: str = "eval", seed: int = 0, B: int = 4, **kwargs):
    factory, likelihood = MODELS[name]
    torch.manual_seed(seed)
    C = 3 if likelihood == "classification" else 2
    model = factory(C, **kwargs).to(DT)
    model.train(mode == "train")
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, 12, generator=g, dtype=DT)
    y = (torch.randint(0, C, (B,), generator=g) if likelihood == "classification"
         else torch.randn(B, C, generator=g, dtype=DT))
    return register(model), x, y, likelihood


# --- brute force (outputs of any shape are flattened per sample) ----------------------------


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def flat_grad(out, params, create_graph=False):
    gs = torch.autograd.grad(out, params, allow_unused=True, retain_graph=True,
                             create_graph=create_graph)
    return torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten()
                      for g, p in zip(gs, params)])


def sample_loss(f, y, likelihood, ignore_index=-100):
    """Loss of one sample written out: counted tokens only, ``f`` `(C,)` or `(T, C)`."""
    if likelihood == "regression":
        return 0.5 * ((f - y.reshape(f.shape)) ** 2).sum()
    f, y = f.reshape(-1, f.shape[-1]), y.reshape(-1)
    keep = (y != ignore_index).nonzero().flatten()
    return -sum(torch.log_softmax(f[t], -1)[y[t]] for t in keep.tolist())


def jacobians(model, x):
    """`(B, T·C, P)` by a loop over samples and outputs; and f."""
    params = params_of(model)
    Js, fs = [], []
    with reference_kernels():
        for n in range(x.shape[0]):
            f = model(x[n:n + 1])[0]
            Js.append(torch.stack([flat_grad(fi, params) for fi in f.flatten()]))
            fs.append(f.detach())
    return torch.stack(Js), torch.stack(fs)


def gradients(model, x, y, likelihood, ignore_index=-100):
    params = params_of(model)
    with reference_kernels():
        return torch.stack([flat_grad(sample_loss(model(x[n:n + 1])[0], y[n], likelihood,
                                                  ignore_index), params)
                            for n in range(x.shape[0])])


def output_hessian(f, y, likelihood, ignore_index=-100):
    """Λ of one sample from its textbook formula; zero blocks for ignored tokens."""
    if likelihood == "regression":
        return torch.eye(f.numel(), dtype=f.dtype)
    f2, y2 = f.reshape(-1, f.shape[-1]), (y.reshape(-1) if y is not None else None)
    blocks = []
    for t in range(f2.shape[0]):
        p = torch.softmax(f2[t], -1)
        keep = y2 is None or int(y2[t]) != ignore_index
        blocks.append((torch.diag(p) - torch.outer(p, p)) * keep)
    return torch.block_diag(*blocks)


def curvature(kind, model, x, y, likelihood, ignore_index=-100):
    if kind == "ef":
        G = gradients(model, x, y, likelihood, ignore_index)
        return G.T @ G
    if kind == "ggn":
        J, f = jacobians(model, x)
        return sum(J[n].T @ output_hessian(f[n], y[n], likelihood, ignore_index) @ J[n]
                   for n in range(x.shape[0]))
    raise ValueError(kind)


def total_loss(model, x, y, likelihood, ignore_index=-100):
    f = model(x)
    return sum(sample_loss(f[n], y[n], likelihood, ignore_index) for n in range(x.shape[0]))


def hessian_rows(model, x, y, likelihood, idx, ignore_index=-100):
    """Rows ``idx`` of the loss Hessian, restricted to columns ``idx``."""
    params = params_of(model)
    with reference_kernels():
        g = flat_grad(total_loss(model, x, y, likelihood, ignore_index), params, True)
        return torch.stack([flat_grad(g[i], params)[idx] for i in idx.tolist()])


def hvp(model, x, y, likelihood, V, ignore_index=-100):
    params = params_of(model)
    with reference_kernels():
        g = flat_grad(total_loss(model, x, y, likelihood, ignore_index), params, True)
        return torch.stack([flat_grad(g @ v, params) for v in V.T], 1)


def spread_indices(model, per_tensor: int = 2) -> torch.Tensor:
    """A few entries of every trainable tensor: a subnetwork that touches the whole model."""
    idx, start = [], 0
    for p in params_of(model):
        n = p.numel()
        idx += sorted({start + (i * 7919) % n for i in range(per_tensor)})
        start += n
    return torch.tensor(idx)


def check_every_method(kind, model, x, y, likelihood, **kw):
    """jacobians, gradients, full/diag (on a spread subnetwork), operator products (all)."""
    ignore = kw.get("ignore_index", -100)
    cls = KINDS[kind]
    J, f = jacobians(model, x)
    Js, f_got = cls(model, likelihood, **kw).jacobians(x)
    torch.testing.assert_close(Js, J.transpose(1, 2), **TOL)
    torch.testing.assert_close(f_got, f, **TOL)
    loss, Gs = cls(model, likelihood, **kw).gradients(x, y)
    torch.testing.assert_close(Gs, gradients(model, x, y, likelihood, ignore), **TOL)
    with reference_kernels(), torch.no_grad():
        torch.testing.assert_close(loss, total_loss(model, x, y, likelihood, ignore), **TOL)
    idx = spread_indices(model)
    if kind == "hessian":
        H = hessian_rows(model, x, y, likelihood, idx, ignore)
    else:
        H = curvature(kind, model, x, y, likelihood, ignore)
    sub = cls(model, likelihood, subnetwork_indices=idx, **kw)
    H_sub = H if kind == "hessian" else H[idx][:, idx]
    torch.testing.assert_close(sub.full(x, y)[1], H_sub, **TOL)
    torch.testing.assert_close(sub.diag(x, y)[1], H_sub.diagonal(), **TOL)
    _, op = cls(model, likelihood, **kw).full_operator(x, y)
    V = torch.randn(op.shape[0], 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    want = hvp(model, x, y, likelihood, V, ignore) if kind == "hessian" else H @ V
    torch.testing.assert_close(op @ V, want, **TOL)


# --- every method, eval and train mode ------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_eval(name, kind):
    """Eval mode (dropout p=0.1 inactive, MHA fast path would be taken): against brute force."""
    model, x, y, likelihood = build(name)
    check_every_method(kind, model, x, y, likelihood)


@pytest.mark.parametrize("name", ["encoder", "decoder", "cross_mha"])
def test_train_mode_without_dropout(name):
    """Train mode with p=0 is deterministic and works (no fast path is involved)."""
    model, x, y, likelihood = build(name, mode="train", dropout=0.0)
    check_every_method("ggn", model, x, y, likelihood)
    if name == "encoder":
        idx = spread_indices(model, per_tensor=1)
        torch.testing.assert_close(
            curvop.TorchHessian(model, likelihood, subnetwork_indices=idx).full(x, y)[1],
            hessian_rows(model, x, y, likelihood, idx), **TOL)


def test_last_layer_and_settings_kept_by_operator_products():
    model, x, y, likelihood = build("encoder")
    iface = curvop.TorchGGN(model, likelihood, last_layer=True)
    torch.testing.assert_close(iface.full(x, y)[1],
                               ref.ggn(model, x, y, likelihood, last_layer=True), **TOL)
    # products long after the call, under the user's (default) settings
    _, op = curvop.TorchHessian(model, likelihood).full_operator(x, y)
    assert settings()["fastpath"] and settings()["flash"]
    V = torch.randn(op.shape[0], 1, dtype=DT)
    torch.testing.assert_close(op @ V, hvp(model, x, y, likelihood, V), **TOL)


CALLS = {
    "jacobians": lambda i, x, y: i.jacobians(x),
    "gradients": lambda i, x, y: i.gradients(x, y),
    "full": lambda i, x, y: i.full(x, y),
    "diag": lambda i, x, y: i.diag(x, y),
    "full_operator": lambda i, x, y: i.full_operator(x, y),
    "kron": lambda i, x, y: i.kron(x, y, 4, fallback="diag"),
    "dataset_operator": lambda i, x, y: i.dataset_operator([(x, y)]),
    "eig_lowrank": lambda i, x, y: i.eig_lowrank([(x, y)]),
}


@pytest.mark.parametrize("method", list(CALLS))
def test_active_dropout_raises(method):
    """Dropout p>0 in train mode: a clear error naming the modules; RNG and model untouched."""
    model, x, y, likelihood = build("encoder", mode="train", dropout=0.1)
    rng = torch.get_rng_state()
    with pytest.raises(NotSupportedError, match=r"dropout.*enc\.layers\.0\.self_attn.*eval"):
        CALLS[method](curvop.TorchGGN(model, likelihood), x, y)
    assert torch.equal(rng, torch.get_rng_state())


class FunctionalDropout(nn.Module):
    """Dropout no module attribute reveals: caught by the random-number probe."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 3)

    def forward(self, x):
        return self.lin(F.dropout(x, 0.2, training=self.training))


@pytest.mark.parametrize("kind", list(KINDS))
def test_functional_dropout_raises_and_keeps_rng(kind):
    model = register(FunctionalDropout().to(DT).train())
    x, y = torch.randn(3, 12, dtype=DT), torch.tensor([0, 1, 2])
    rng = torch.get_rng_state()
    with pytest.raises(NotSupportedError, match="random numbers"):
        KINDS[kind](model, "classification").full(x, y)
    assert torch.equal(rng, torch.get_rng_state())
    model.eval()
    register(model)
    KINDS[kind](model, "classification").full(x, y)  # deterministic in eval mode


# --- the kernel switch: inside, restored after, also on errors ------------------------------


class Probe(nn.Module):
    """Records the global settings seen by its forward; raises on demand."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.seen: list[dict] = []
        self.fail = False

    def forward(self, x):
        self.seen.append(settings())
        if self.fail:
            raise RuntimeError("failure inside the model")
        return self.inner(x)


@pytest.mark.parametrize("name", ["encoder", "lstm"])
def test_kernels_swapped_inside_and_restored_after_errors(name):
    inner, x, y, likelihood = build(name)
    probe = Probe(inner)
    before = settings()
    curvop.TorchGGN(probe, likelihood).full(x, y)
    assert probe.seen
    for s in probe.seen:
        assert not s["fastpath"] and not s["flash"] and not s["mem_efficient"]
        assert s["math"] and not s["cudnn_sdp"]
        assert s["cudnn"] is (name != "lstm")  # cuDNN only off for RNNs
    probe.fail = True
    for method in ("jacobians", "full", "diag", "full_operator"):
        with pytest.raises(RuntimeError, match="failure inside"):
            CALLS[method](curvop.TorchHessian(probe, likelihood), x, y)
        assert settings() == before


def test_failure_inside_the_functional_forward_restores(monkeypatch):
    """A forward that raises leaves the kernel settings and the model's own tensors in place."""
    model, x, y, likelihood = build("encoder")
    own = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}

    def broken(*args, **kwargs):
        assert not torch.backends.mha.get_fastpath_enabled()
        # the forward sees curvop's tensors in place of the user's
        assert all(t is not own[n] for n, t in model.named_parameters())
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "forward", broken)
    before = settings()
    for kind in KINDS:
        with pytest.raises(RuntimeError, match="boom"):
            KINDS[kind](model, likelihood).diag(x, y)
        assert settings() == before
        now = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
        assert now.keys() == own.keys() and all(now[n] is own[n] for n in own)


def test_user_settings_are_restored_not_reset():
    """Non-default user choices survive (curvop restores, it does not reset to defaults)."""
    model, x, y, likelihood = build("encoder")
    H = curvature("ggn", model, x, y, likelihood)
    with user_settings(fastpath=False, flash=False, math=False, cudnn=False):
        before = settings()
        assert not before["math"]
        torch.testing.assert_close(curvop.TorchGGN(model, likelihood).full(x, y)[1], H, **TOL)
        assert settings() == before


# --- data-set operators and eig_lowrank -----------------------------------------------------


def test_dataset_operator_and_eig_lowrank():
    model, x, y, likelihood = build("encoder", B=6)
    loader = [(x[:3], y[:3]), (x[3:], y[3:])]
    H = curvature("ggn", model, x, y, likelihood)
    V = torch.randn(H.shape[0], 2, dtype=DT)
    torch.testing.assert_close(curvop.TorchGGN(model, likelihood).dataset_operator(loader) @ V,
                               H @ V, **TOL)
    vecs, vals, _ = curvop.TorchGGN(model, likelihood, low_rank=3).eig_lowrank(loader)
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(H).flip(0)[:3], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(H @ vecs, vecs * vals, rtol=1e-6, atol=1e-8)
    op = curvop.TorchHessian(model, likelihood).dataset_operator(loader)
    torch.testing.assert_close(op @ V, hvp(model, x, y, likelihood, V), **TOL)


# --- token-level outputs ---------------------------------------------------------------------


def tagger_data():
    torch.manual_seed(0)
    model = register(Tagger(3).to(DT).eval())
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 1, 2, 3]])
    y = torch.tensor([[0, 1, 2, -100], [2, 1, -100, -100], [0, 0, 1, 2]])
    return model, ids, y


@pytest.mark.parametrize("kind", list(KINDS))
def test_token_classification_with_padding(kind):
    """(B, T, C) outputs, loss summed over tokens, padding ignored: against brute force."""
    model, ids, y = tagger_data()
    check_every_method(kind, model, ids, y, "classification")
    Js, f = curvop.TorchGGN(model, "classification").jacobians(ids)
    assert Js.shape == (3, sum(p.numel() for p in model.parameters()), 4 * 3)
    assert f.shape == (3, 4, 3)


def test_token_classification_custom_ignore_index_and_ignored_tokens_count_nothing():
    model, ids, y = tagger_data()
    y1 = torch.where(y == -100, -1, y)
    got = curvop.TorchGGN(model, "classification", ignore_index=-1).full(ids, y1)
    torch.testing.assert_close(got[1], curvature("ggn", model, ids, y, "classification"), **TOL)
    # an ignored token's label does not matter; an ignored everything gives zero
    loss, H0 = curvop.TorchEF(model, "classification").full(ids, torch.full_like(y, -100))
    assert float(loss) == 0 and not H0.any()
    assert curvop.TorchGGN(model, "classification").lossfunc.ignore_index == -100


def test_token_level_last_layer_and_eig_lowrank():
    model, ids, y = tagger_data()
    G = curvature("ggn", model, ids, y, "classification")
    n_head = sum(p.numel() for p in model.head.parameters())
    got = curvop.TorchGGN(model, "classification", last_layer=True).full(ids, y)[1]
    torch.testing.assert_close(got, G[-n_head:, -n_head:], **TOL)
    loader = [(ids[:2], y[:2]), (ids[2:], y[2:])]
    _, vals, _ = curvop.TorchGGN(model, "classification", low_rank=2).eig_lowrank(loader)
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(G).flip(0)[:2], rtol=1e-7, atol=1e-9)


def test_token_classification_mc_fisher():
    """MC Fisher: one sampled label per token and column; reproducible; the GGN on average."""
    model, ids, y = tagger_data()
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    iface = curvop.TorchGGN(model, "classification", stochastic=True, num_samples=2,
                            generator=gen())
    H = iface.full(ids, y)[1]
    J, f = jacobians(model, ids)
    S = TokenClassification(3).sampled_sqrt_output_hessian(f.flatten(1), 2, gen(), y=y)
    want = sum(J[n].T @ S[n] @ S[n].T @ J[n] for n in range(3))
    torch.testing.assert_close(H, want, **TOL)
    # S Sᵀ is unbiased for the block-diagonal Λ, zero on ignored tokens
    S = TokenClassification(3).sampled_sqrt_output_hessian(f.flatten(1), 40000, gen(), y=y)
    Lam = torch.stack([output_hessian(f[n], y[n], "classification") for n in range(3)])
    torch.testing.assert_close(S @ S.mT, Lam, rtol=0, atol=2e-2)
    assert not S[1, 6:].any()


def test_token_regression_lstm():
    torch.manual_seed(0)
    model = register(LSTMNet(2, tokens=True).to(DT).eval())
    x, y = torch.randn(3, 12, dtype=DT), torch.randn(3, 3, 2, dtype=DT)
    for kind in KINDS:
        check_every_method(kind, model, x, y, "regression")


def test_token_level_errors():
    model, ids, y = tagger_data()
    iface = curvop.TorchGGN(model, "classification")
    with pytest.raises(InputError, match=r"label 3 out of range \[0, 3\).*ignore_index"):
        iface.full(ids, torch.where(y == 1, 3, y))
    with pytest.raises(InputError, match=r"shape \(3, 4\)"):
        iface.full(ids, y[:, :2])
    with pytest.raises(TypeError, match="ignore_index"):
        curvop.TorchGGN(model, "classification", ignore_index=1.5)
    with pytest.raises(NotSupportedError, match="token-level"):
        curvop.BackPackGGN(model, "classification").diag(ids, y)


# --- Kronecker factors with attention --------------------------------------------------------


def dense_blocks(K) -> list[torch.Tensor]:
    ends = torch.tensor(K.block_sizes).cumsum(0).tolist()
    Kd = K.to_dense()
    return [Kd[i:j, i:j] for i, j in zip([0, *ends[:-1]], ends)]


@pytest.mark.parametrize("name", ["encoder", "decoder", "tagger"])
def test_kron_whole_transformers_exact_for_one_datum_of_identical_tokens(name):
    """LayerNorm (and Embedding) need ``fallback``; then, for one datum whose tokens are all
    the same, 'reduce' is exact for every Linear and attention block, and the fallback blocks
    are exact: the Kron is the dense GGN on its blocks."""
    if name == "tagger":
        model, _, _ = tagger_data()
        x, y, likelihood = torch.tensor([[3, 3, 3, 3]]), torch.tensor([[0, 2, -100, 1]]), \
            "classification"
    else:
        model, _, y, likelihood = build(name, B=1)
        x = torch.randn(1, 12 // (3 if name == "encoder" else 4), dtype=DT)
        x = x.repeat(1, 3 if name == "encoder" else 4)
    iface = curvop.TorchGGN(model, likelihood)
    with pytest.raises(NotSupportedError, match="LayerNorm"):  # embeddings have a Kron form
        iface.kron(x, y, 1)
    K = iface.kron(x, y, 1, approx="reduce", fallback="full")[1]
    n_attn = sum(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    in_proj = sum(p.shape == (3 * D, D) for n, p in model.named_parameters())
    assert n_attn == in_proj and len(K.kfacs) == len(params_of(model)) + 2 * n_attn
    assert_block_diagonal_of(K, iface.full(x, y)[1])


def explicit_attention(mha, query, key, value):
    """nn.MultiheadAttention written out (batch first): projections, heads, softmax."""
    n, Tq, E = query.shape
    dh = E // mha.num_heads
    Wq, Wk, Wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    q, k, v = query @ Wq.T + bq, key @ Wk.T + bk, value @ Wv.T + bv

    def heads(t):
        return t.unflatten(-1, (mha.num_heads, dh)).transpose(1, 2)

    att = torch.softmax(heads(q) @ heads(k).mT / math.sqrt(dh), -1)
    o = (att @ heads(v)).transpose(1, 2).reshape(n, Tq, E)
    return q, k, v, o, o @ mha.out_proj.weight.T + mha.out_proj.bias


def attention_factors(model, x, y, likelihood, N, approx):
    """Brute-force factors of in_proj (3 groups), in_proj_bias, out_proj from autograd."""
    with torch.no_grad():
        f_all = model(x)
    lik = curvop.TorchGGN(model, likelihood)._likelihood
    S = lik.sqrt_output_hessian(f_all)
    A = [0, 0, 0]
    Bs = [0, 0, 0]
    Cb = 0
    Ao = Bo = Co = 0
    for n in range(x.shape[0]):
        query, kv = model.tokens(x[n:n + 1])
        q, k, v, o, out = explicit_attention(model.mha, query, kv, kv)
        f = model.head(out.mean(1))[0]
        torch.testing.assert_close(f, f_all[n], **TOL)  # the explicit forward is the model's
        ins = [query[0].detach(), kv[0].detach(), kv[0].detach()]
        for i, a in enumerate(ins):
            a_ = a.mean(0, keepdim=True) if approx == "reduce" else a
            Bs[i] = Bs[i] + a_.T @ a_ / (N * (1 if approx == "reduce" else a.shape[0]))
        a_o = o[0].detach()
        a_o = a_o.mean(0, keepdim=True) if approx == "reduce" else a_o
        Bo = Bo + a_o.T @ a_o / (N * (1 if approx == "reduce" else o.shape[1]))
        for col in S[n].T:
            gq, gk, gv, gout = torch.autograd.grad(f @ col, [q, k, v, out], retain_graph=True)
            gs = [gq[0], gk[0], gv[0]]
            for i, g in enumerate(gs):
                g_ = g.sum(0, keepdim=True) if approx == "reduce" else g
                A[i] = A[i] + g_.T @ g_
            gb = torch.cat([g.sum(0) for g in gs])
            Cb = Cb + torch.outer(gb, gb)
            go = gout[0].sum(0, keepdim=True) if approx == "reduce" else gout[0]
            Ao = Ao + go.T @ go
            Co = Co + torch.outer(gout[0].sum(0), gout[0].sum(0))
    return [[A[i], Bs[i]] for i in range(3)] + [[Cb], [Ao, Bo], [Co]]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("cross", [0, 1, 2], ids=["self", "cross1", "cross2"])
def test_attention_kron_factors_brute_force(cross, approx):
    """in_proj as [A_q, B_q], [A_k, B_k], [A_v, B_v] (key/value inputs differ from the query's
    in cross-attention, and so do their token counts), in_proj_bias [C], out_proj [A, B], [C]."""
    torch.manual_seed(0)
    model = register(Attention(3, cross=cross).to(DT).eval())
    x, y = torch.randn(3, 12, dtype=DT), torch.tensor([0, 2, 1])
    K = curvop.TorchGGN(model, "classification").kron(x, y, 7, approx=approx)[1]
    want = attention_factors(model, x, y, "classification", 7, approx)
    got = K.kfacs[2:8]  # after inp.weight [A, B] and inp.bias [C]
    assert [len(b) for b in got] == [2, 2, 2, 1, 2, 1]
    for g, w in zip(got, want):
        for gf, wf in zip(g, w):
            torch.testing.assert_close(gf, wf, **TOL)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_attention_kron_exact_for_one_datum(approx):
    """One datum, one query token (cross-attention to 3 keys): the query block of in_proj, the
    bias and out_proj blocks are the dense GGN blocks; with identical tokens and 'reduce'
    every block of a self-attention model is."""
    torch.manual_seed(0)
    model = register(Attention(3, cross=1).to(DT).eval())
    x, y = torch.randn(1, 12, dtype=DT), torch.tensor([2])
    iface = curvop.TorchGGN(model, "classification")
    K, G = iface.kron(x, y, 1, approx=approx)[1], iface.full(x, y)[1]
    Kb, sizes = dense_blocks(K), K.block_sizes
    start = sum(sizes[:2])
    q = slice(start, start + D * D)
    torch.testing.assert_close(Kb[2], G[q, q], **TOL)
    for i in range(5, len(sizes)):  # in_proj_bias, out_proj, head
        s = slice(sum(sizes[:i]), sum(sizes[:i + 1]))
        torch.testing.assert_close(Kb[i], G[s, s], **TOL)
    if approx == "reduce":
        model = register(Attention(3, cross=0).to(DT).eval())
        x = torch.randn(1, 3, dtype=DT).repeat(1, 4)
        iface = curvop.TorchGGN(model, "classification")
        assert_block_diagonal_of(iface.kron(x, y, 1, approx=approx)[1], iface.full(x, y)[1])


def assert_block_diagonal_of(K, G):
    """``K.to_dense()`` is ``G`` restricted to the Kron's diagonal blocks."""
    mask = torch.block_diag(*[torch.ones(s, s, dtype=DT) for s in K.block_sizes])
    torch.testing.assert_close(K.to_dense(), G * mask, **TOL)


def test_sdpa_and_decoder_kron():
    """Hand-written attention: Linear taps only, no fallback needed; exact for one datum of
    identical tokens with 'reduce'. The decoder's taps pass their check."""
    torch.manual_seed(0)
    model = register(SDPA(3).to(DT).eval())
    x, y = torch.randn(1, 4, dtype=DT).repeat(1, 3), torch.tensor([1])
    iface = curvop.TorchGGN(model, "classification")
    assert_block_diagonal_of(iface.kron(x, y, 1, approx="reduce")[1], iface.full(x, y)[1])


# --- CUDA (skipped without a device) ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["encoder", "decoder", "lstm"])
def test_cuda_fused_kernels_are_swapped(name):
    """On CUDA the fused attention kernels (flash, memory-efficient, cuDNN) and cuDNN's LSTM
    have no double backward (cuDNN RNNs no backward at all in eval mode): every method runs
    and matches the CPU float64 reference, in float32."""
    import copy

    model, x, y, likelihood = build(name)
    idx = spread_indices(model, per_tensor=1)
    G = curvature("ggn", model, x, y, likelihood)
    Hs = hessian_rows(model, x, y, likelihood, idx)
    V = torch.randn(G.shape[0], 2, dtype=DT)
    HV = hvp(model, x, y, likelihood, V)
    cuda = register(copy.deepcopy(model).float().cuda())
    xc = x.float().cuda()
    yc = y.float().cuda() if y.is_floating_point() else y.cuda()
    tol = {"rtol": 1e-3, "atol": 1e-4}

    def close(got, want):
        torch.testing.assert_close(got.double().cpu(), want, **tol)

    close(curvop.TorchGGN(cuda, likelihood).full(xc, yc)[1], G)
    close(curvop.TorchGGN(cuda, likelihood).diag(xc, yc)[1], G.diagonal())
    close(curvop.TorchHessian(cuda, likelihood, subnetwork_indices=idx).full(xc, yc)[1], Hs)
    _, op = curvop.TorchHessian(cuda, likelihood).full_operator(xc, yc)
    close(op @ V.float().cuda(), HV)
    _, op = curvop.TorchGGN(cuda, likelihood).full_operator(xc, yc)
    close(op @ V.float().cuda(), G @ V)
    curvop.TorchGGN(cuda, likelihood).kron(xc, yc, 4, fallback="diag")
