"""KFAC with the columns folded into copies of the batch (the GPU route), forced on CPU.

On GPUs ``curvop.kfac`` backpropagates a block of columns of the output-Hessian root as one
backward pass through stacked copies of the batch (``curvop._taps.tap_layer_blocks`` with
``fold=True``). CI has no GPU, so these tests switch the policy on for the CPU and check the
factors against the brute-force ones and against the default route, for whole and partial
blocks of columns.
"""

from __future__ import annotations

import pytest
import torch
from test_kfac import DT, TinyTransformer, assert_kfacs, brute_kfacs, build, ef_sqrt, sqrt_lambda
from torch import nn

import curvop
import curvop._taps as taps_mod
import curvop.kfac as kfac_mod

from cases import Counted, register


@pytest.fixture(params=["all", 2], ids=["block=K", "block=2"])
def folded(request, monkeypatch):
    """Fold every block of columns; blocks of all ``K`` columns or of 2 (several passes)."""
    monkeypatch.setattr(kfac_mod, "_fold_columns", lambda device: True)
    block = request.param
    monkeypatch.setattr(kfac_mod, "_column_block",
                        lambda module, K, device: K if block == "all" else min(block, K))
    calls = {"n": 0}
    stacked = taps_mod._FoldedColumns.stacked

    def counted(self):
        calls["n"] += 1
        return stacked(self)

    monkeypatch.setattr(taps_mod._FoldedColumns, "stacked", counted)
    kfac_mod._SAMPLE_BYTES.clear()  # the block is remembered per model
    yield calls
    kfac_mod._SAMPLE_BYTES.clear()


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d", "conv3d", "seq", "grouped_t1"])
def test_folded_ggn_factors_equal_brute_force(folded, name, approx):
    model, x, y = build(name)
    iface = curvop.TorchGGN(model, "classification")
    S = sqrt_lambda(model(x), "classification")
    for _ in range(2):  # the two-forward first call, then the one-forward route
        _, K = iface.kron(x, y, N=10, approx=approx)
        assert_kfacs(K.kfacs, brute_kfacs(model, x, S, 10, approx))
    assert folded["n"] > 0


@pytest.mark.parametrize("name", ["cnn", "seq"])
def test_folded_ef_regression_and_mc_factors(folded, name):
    model, x, y = build(name, "regression")
    _, K = curvop.TorchGGN(model, "regression").kron(x, y, N=8, approx="reduce")
    assert_kfacs(K.kfacs, brute_kfacs(model, x, sqrt_lambda(model(x), "regression"), 8,
                                      "reduce"))
    _, K = curvop.TorchEF(model, "regression").kron(x, y, N=8)
    assert_kfacs(K.kfacs, brute_kfacs(model, x, ef_sqrt(model, x, y, "regression"), 8,
                                      "expand"))
    model, x, y = build(name)
    gen = torch.Generator().manual_seed(7)
    _, K = curvop.TorchGGN(model, "classification", stochastic=True, num_samples=3,
                           generator=gen).kron(x, y, N=6)
    S = curvop.likelihoods.Likelihood("classification").sampled_sqrt_output_hessian(
        model(x).detach(), 3, torch.Generator().manual_seed(7))
    assert_kfacs(K.kfacs, brute_kfacs(model, x, S, 6, "expand"))


def test_folded_chunks_one_forward_and_untouched_model(folded):
    inner, x, y = build("cnn", batch=7)
    model = Counted(inner)
    register(model)
    iface = curvop.TorchGGN(model, "classification")
    S = sqrt_lambda(inner(x), "classification")
    want = brute_kfacs(inner, x, S, 7, "expand")
    assert_kfacs(iface.kron(x, y, N=7)[1].kfacs, want)
    before = len(model.counter)
    assert_kfacs(iface.kron(x, y, N=7)[1].kfacs, want)
    assert len(model.counter) - before == 1  # the folded forward is the only one
    chunked = curvop.TorchGGN(model, "classification", memory_budget=1)
    assert_kfacs(chunked.kron(x, y, N=7)[1].kfacs, want)
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_folded_token_outputs_last_layer_and_fallback(folded):
    torch.manual_seed(0)
    model = register(nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 5), nn.LayerNorm(5),
                                   nn.Tanh(), nn.Linear(5, 3)).to(DT))
    x = torch.randint(0, 7, (4, 6))
    y = torch.randint(0, 3, (4, 6))
    y[0, :2] = -100
    results = {}
    for fold in (True, False):
        kfac_mod._SAMPLE_BYTES.clear()
        with pytest.MonkeyPatch.context() as mp:
            if not fold:
                mp.setattr(kfac_mod, "_fold_columns", lambda device: False)
            for kwargs in ({"fallback": "diag"}, {}):
                last = not kwargs
                iface = curvop.TorchGGN(model, "classification", last_layer=last)
                results[fold, last] = [iface.kron(x, y, N=4, **kwargs)[1] for _ in range(2)]
    for last in (True, False):
        for got, want in zip(results[True, last], results[False, last]):
            assert_kfacs(got.kfacs, want.kfacs)
    assert folded["n"] > 0


def test_attention_is_not_folded_and_still_exact(folded):
    """A tapped nn.MultiheadAttention keeps the unfolded route (its taps are not batch-first)."""
    torch.manual_seed(0)
    model = register(TinyTransformer(padding_idx=0).to(DT).eval())
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 11, (4, 5), generator=g)
    y = torch.randint(0, 3, (4,), generator=g)
    iface = curvop.TorchGGN(model, "classification")
    K1 = iface.kron(x, y, N=4, fallback="diag")[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kfac_mod, "_fold_columns", lambda device: False)
        kfac_mod._SAMPLE_BYTES.clear()
        K2 = iface.kron(x, y, N=4, fallback="diag")[1]
    assert_kfacs(K1.kfacs, K2.kfacs)
    assert folded["n"] == 0


def test_default_working_budget_follows_the_device(monkeypatch):
    """256 MiB on the CPU; a thirty-second of a GPU's memory (at least 256 MiB); a given
    ``memory_budget`` on every device. Larger chunks on a GPU: fewer launches of each kernel."""
    from types import SimpleNamespace

    model, _, _ = build("mlp")
    default = curvop.TorchGGN(model, "classification")
    given = curvop.TorchGGN(model, "classification", memory_budget=12345)
    assert default.memory_budget is None
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert default._working_budget(cpu) == 256 * 2**20
    for total, expected in ((80 * 10**9, 80 * 10**9 // 32), (4 * 2**30, 256 * 2**20)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, t=total: SimpleNamespace(total_memory=t))
        assert default._working_budget(cuda) == expected
        assert given._working_budget(cuda) == 12345
    assert given._working_budget(cpu) == 12345
    with pytest.raises(curvop.errors.InputError, match="memory_budget"):
        curvop.TorchGGN(model, "classification", memory_budget=0)
