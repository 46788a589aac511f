"""Properties every curvature must have, whatever the backend: they could each fail."""

from __future__ import annotations

import pytest
import torch

from curvature.test_conformance import assert_unsupported, unsupported

import reference as ref
from cases import Case, cases, register
from registry import BACKENDS, backend_ids

CASES = cases(dtypes=(torch.float64,))


def _kinds(backend):
    return [k for k in ("ggn", "ef", "hessian") if k in BACKENDS[backend]]


@pytest.mark.parametrize("backend", backend_ids())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_batch_additivity_symmetry_psd(case, backend):
    model, x, y = case.build()
    for kind in _kinds(backend):
        iface = BACKENDS[backend][kind](model, case.likelihood)
        if unsupported(backend, case.model_name, "all", f"{kind}.diag"):
            assert_unsupported(iface.diag, x[:2], y[:2])
            if unsupported(backend, case.model_name, "all", f"{kind}.full"):
                assert_unsupported(iface.full, x[2:], y[2:])
            continue
        _, h = iface.diag(x, y)
        _, h1 = iface.diag(x[:2], y[:2])
        _, h2 = iface.diag(x[2:], y[2:])
        torch.testing.assert_close(h1 + h2, h, rtol=1e-10, atol=1e-12)
        _, H = iface.full(x, y)
        torch.testing.assert_close(H, H.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(iface.full(x[:2], y[:2])[1] + iface.full(x[2:], y[2:])[1], H,
                                   rtol=1e-10, atol=1e-12)
        if kind != "hessian":
            assert torch.linalg.eigvalsh(H).min() > -1e-10 * H.abs().max()
            assert (h >= 0).all()


@pytest.mark.parametrize("backend", backend_ids())
@pytest.mark.parametrize("case", cases(models=["tanh_mlp", "two_path"]), ids=lambda c: c.id)
def test_last_layer_is_block_and_subnetwork_is_submatrix(case, backend):
    model, x, y = case.build()
    cls = BACKENDS[backend]["ggn"]
    H_last = cls(model, case.likelihood, last_layer=True).full(x, y)[1]
    if unsupported(backend, case.model_name, "all", "ggn.full"):
        # the whole model is out of reach; its last layer is not
        assert_unsupported(cls(model, case.likelihood).full, x, y)
        idx = torch.tensor([sum(p.numel() for p in model.parameters() if p.requires_grad) - 1])
        sub = cls(model, case.likelihood, subnetwork_indices=idx)
        if unsupported(backend, case.model_name, "last_entry", "ggn.diag"):
            assert_unsupported(sub.diag, x, y)
        else:  # only the layers of the selected parameters matter to this backend
            torch.testing.assert_close(sub.diag(x, y)[1], H_last.diagonal()[-1:],
                                       rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(H_last, ref.ggn(model, x, y, case.likelihood, True),
                                   rtol=1e-10, atol=1e-12)
        return
    H = cls(model, case.likelihood).full(x, y)[1]
    P_last = sum(p.numel() for p in ref.selected_params(model, True))
    torch.testing.assert_close(H_last, H[-P_last:, -P_last:], rtol=1e-10, atol=1e-12)
    idx = torch.tensor([H.shape[0] - 1, 0, 3, 7])
    H_sub = cls(model, case.likelihood, subnetwork_indices=idx).full(x, y)[1]
    torch.testing.assert_close(H_sub, H[idx][:, idx], rtol=1e-10, atol=1e-12)
    h_sub = cls(model, case.likelihood, subnetwork_indices=idx).diag(x, y)[1]
    torch.testing.assert_close(h_sub, H.diagonal()[idx], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", backend_ids())
def test_dtype_preserved(backend, dtype):
    case = Case("tanh_mlp", "classification", dtype)
    model, x, y = case.build()
    for kind in _kinds(backend):
        iface = BACKENDS[backend][kind](model, "classification")
        for out in (iface.full(x, y), iface.diag(x, y), iface.gradients(x, y)):
            assert out[1].dtype == dtype and out[0].dtype == dtype
        Js, f = iface.jacobians(x)
        assert Js.dtype == dtype and f.dtype == dtype


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_ids())
def test_device_preserved_cuda(backend):
    model, x, y = Case("tanh_mlp", "classification", device="cuda").build()
    for kind in _kinds(backend):
        _, H = BACKENDS[backend][kind](model, "classification").full(x, y)
        assert H.device.type == "cuda"


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_mc_fisher_reproducible_and_unbiased(likelihood):
    cls = BACKENDS["torch"]["ggn"]
    model, x, y = Case("tanh_mlp", likelihood, batch=4).build()
    exact = cls(model, likelihood).full(x, y)[1]

    def mc(seed, n):
        g = torch.Generator().manual_seed(seed)
        return cls(model, likelihood, stochastic=True, num_samples=n, generator=g)

    a, b = mc(3, 2), mc(3, 2)
    torch.testing.assert_close(a.full(x, y)[1], b.full(x, y)[1], rtol=0, atol=0)
    torch.testing.assert_close(a.diag(x, y)[1], b.diag(x, y)[1], rtol=0, atol=0)
    assert not torch.equal(mc(3, 2).full(x, y)[1], mc(4, 2).full(x, y)[1])
    # 20,000 samples per datum: the relative Frobenius error of an average of n i.i.d. rank-1
    # terms falls like 1/sqrt(n); 0.05 is over 5 standard errors for these models.
    approx = mc(0, 20000).full(x, y)[1]
    err = (approx - exact).norm() / exact.norm()
    assert err < 0.05, err


@pytest.mark.montecarlo
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_mc_fisher_converges_heavy(likelihood):
    cls = BACKENDS["torch"]["ggn"]
    model, x, y = Case("cnn", likelihood, batch=4).build()
    exact = cls(model, likelihood).diag(x, y)[1]
    g = torch.Generator().manual_seed(0)
    approx = cls(model, likelihood, stochastic=True, num_samples=200000, generator=g)
    err = (approx.diag(x, y)[1] - exact).norm() / exact.norm()
    assert err < 0.01, err


@pytest.mark.parametrize("case", cases(dtypes=(torch.float64,)), ids=lambda c: c.id)
def test_mc_fisher_equals_reference_with_the_same_samples(case):
    """MC Fisher = Σ_n J_nᵀ S̃_n S̃_nᵀ J_n with S̃ the labels the generator draws: checked by
    drawing the same samples again from a generator with the same seed."""
    model, x, y = case.build()
    cls = BACKENDS["torch"]["ggn"]
    for option in ({}, {"last_layer": True}):
        iface = cls(model, case.likelihood, stochastic=True, num_samples=3,
                    generator=torch.Generator().manual_seed(11), **option)
        J, f = ref.jacobians(model, x, option.get("last_layer", False))
        S = iface._likelihood.sampled_sqrt_output_hessian(f, 3, torch.Generator().manual_seed(11))
        H_ref = torch.einsum("bcp,bck,bdk,bdq->pq", J, S, S, J)
        torch.testing.assert_close(iface.full(x, y)[1], H_ref, rtol=1e-10, atol=1e-12)
        iface.generator.manual_seed(11)
        torch.testing.assert_close(iface.diag(x, y)[1], H_ref.diagonal(), rtol=1e-10,
                                   atol=1e-12)


class _TiedLN(torch.nn.Module):
    """Linear layers with taps, LayerNorms without, a frozen weight with a live bias, a Linear
    used twice (its taps fail the check) and a bare parameter: every route of the diagonal."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.inp = nn.Linear(16, 6)
        self.ln = nn.LayerNorm(6)
        self.shared = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.weight.requires_grad_(False)
        self.ln2 = nn.LayerNorm(6, bias=False)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.ln(self.inp(x)))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        h = self.ln2(torch.tanh(self.frozen(h))) * self.gain
        return self.head(h)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_diag_taps_where_possible_per_sample_vjps_elsewhere(likelihood, monkeypatch):
    """The exact diagonal with some layers tapped and the rest through per-sample VJPs equals
    the dense reference (GGN, EF, MC Fisher; whole model and a subnetwork), and the per-sample
    path sees only the parameters without taps."""
    from curvop._functional import Batch

    torch.manual_seed(0)
    model = _TiedLN().double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g) if likelihood == "classification" else \
        torch.randn(7, 3, generator=g, dtype=torch.float64)
    register(model)
    seen = []
    live_vjps = Batch.sqrt_vjps_live

    def spy(self, rows, S, slots):
        seen.append({self.sel.names[i] for i in slots})
        return live_vjps(self, rows, S, slots)

    monkeypatch.setattr(Batch, "sqrt_vjps_live", spy)
    monkeypatch.setattr(Batch, "sqrt_vjps", lambda *a, **k: pytest.fail("all-parameter VJPs"))
    tol = {"rtol": 1e-10, "atol": 1e-12}
    cls = BACKENDS["torch"]
    for kind in ("ggn", "ef"):
        H = ref.CURVATURES[kind](model, x, y, likelihood)
        torch.testing.assert_close(cls[kind](model, likelihood).diag(x, y)[1], H.diagonal(),
                                   **tol)
        idx = torch.randperm(H.shape[0], generator=g)[:20]
        h = cls[kind](model, likelihood, subnetwork_indices=idx).diag(x, y)[1]
        torch.testing.assert_close(h, H.diagonal()[idx], **tol)
    untapped = {"ln.weight", "ln.bias", "shared.weight", "shared.bias", "ln2.weight", "gain"}
    assert seen and all(s <= untapped for s in seen) and untapped in seen, seen
    mc = cls["ggn"](model, likelihood, stochastic=True, num_samples=2,
                    generator=torch.Generator().manual_seed(4))
    _, op = mc.full_operator(x, y)
    d = op.diagonal()
    monkeypatch.undo()  # to_dense assembles from all-parameter per-sample VJPs
    torch.testing.assert_close(d, op.to_dense().diagonal(), **tol)
