"""Repeated products replayed as CUDA graphs (curvop.operators._graphs).

On a GPU the second product of a shape is recorded and every later one replayed; the replays
must equal eager products, and whatever cannot be replayed safely (a right-hand side that needs
a gradient, CPU tensors, the switch off) must run eagerly.
"""

from __future__ import annotations

import pytest
import torch

import curvop
from curvop.operators import _graphs

from cases import Case


def _slots(op) -> dict:
    return op.products.__dict__.get("_cuda_graphs", {})


def test_switch_and_cpu_products_stay_eager():
    with pytest.raises(TypeError, match="`enabled` must be a bool"):
        curvop.use_cuda_graphs(1)
    assert curvop.cuda_graphs_enabled()
    model, x, y = Case("tanh_mlp", "classification").build()
    _, op = curvop.TorchGGN(model, "classification").full_operator(x, y)
    v = torch.randn(op.shape[0], dtype=op.dtype)
    first = op @ v
    for _ in range(3):
        torch.testing.assert_close(op @ v, first, rtol=0, atol=0)
    assert not _slots(op)  # nothing recorded for CPU tensors


def test_dataset_operators_keep_their_batches_eager():
    """A graph per batch would hold memory per batch: the per-batch operators stay eager."""
    model, x, y = Case("tanh_mlp", "classification").build()
    loader = [(x[:3], y[:3]), (x[3:], y[3:])]
    for cache in (True, False):
        op = curvop.TorchGGN(model, "classification").dataset_operator(loader, cache=cache)
        v = torch.randn(op.shape[0], dtype=op.dtype)
        op @ v
        assert all(not batch_op._cuda_graphs for batch_op in op._ops())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["TorchGGN", "TorchHessian", "TorchEF"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_replays_equal_eager_products(kind, dtype):
    model, x, y = Case("tanh_mlp", "classification", device="cuda").build()
    model = model.to(dtype)
    x = x.to(dtype)
    _, op = getattr(curvop, kind)(model, "classification").full_operator(x, y)
    P = op.shape[0]
    gen = torch.Generator("cuda").manual_seed(0)
    vs = [torch.randn(P, device="cuda", dtype=dtype, generator=gen) for _ in range(4)]
    V = torch.randn(P, 3, device="cuda", dtype=dtype, generator=gen)
    curvop.use_cuda_graphs(False)
    try:
        eager = [op @ v for v in vs]
        eager_V = op @ V
    finally:
        curvop.use_cuda_graphs(True)
    assert not _slots(op)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for v, ref in zip(vs, eager):  # eager, captured, then replayed
        out = op @ v
        torch.testing.assert_close(out, ref, **tol)
    for _ in range(3):
        torch.testing.assert_close(op @ V, eager_V, **tol)
    slots = _slots(op)
    assert (1, P) in slots and slots[(1, P)].replay is not None, slots[(1, P)].error
    assert (3, P) in slots and slots[(3, P)].replay is not None, slots[(3, P)].error
    out = op @ vs[0]
    assert out.data_ptr() != slots[(1, P)].replay.static_out.data_ptr()  # a tensor of its own
    # a right-hand side that needs a gradient runs eagerly, and its gradient is right
    w = vs[1].clone().requires_grad_()
    (op @ w).square().sum().backward()
    torch.testing.assert_close(w.grad, 2 * (op @ (op @ vs[1])), **tol)


@pytest.mark.gpu
def test_cuda_graphs_switched_off_record_nothing():
    model, x, y = Case("tanh_mlp", "regression", device="cuda").build()
    _, op = curvop.TorchGGN(model, "regression").full_operator(x, y)
    v = torch.randn(op.shape[0], device="cuda", dtype=op.dtype)
    curvop.use_cuda_graphs(False)
    try:
        for _ in range(3):
            op @ v
    finally:
        curvop.use_cuda_graphs(True)
    assert not _slots(op)
    assert _graphs.MAX_SHAPES >= 2


@pytest.mark.gpu
def test_cuda_failed_capture_runs_eagerly_and_leaves_the_generator_usable():
    """A product that cannot be captured (it synchronises with the host) runs eagerly after
    :data:`MAX_FAILURES` tries, and random draws on the device still work afterwards."""

    class Syncing:
        def matmat(self, V):
            float(V.sum())  # a host synchronisation: no capture can hold it
            return 2 * V

    products = Syncing()
    V = torch.randn(2, 5, device="cuda")
    for _ in range(_graphs.MAX_FAILURES + 2):
        torch.testing.assert_close(_graphs.matmat(products, V), 2 * V)
    slot = products._cuda_graphs[(2, 5)]
    assert slot.replay is None and slot.failures == _graphs.MAX_FAILURES
    assert slot.error is not None
    assert torch.randn(3, device="cuda").isfinite().all()  # the generator is usable
    # and a capturable operator is still captured afterwards, with MC draws around it
    model, x, y = Case("tanh_mlp", "classification", device="cuda").build()
    ggn = curvop.TorchGGN(model, "classification", stochastic=True)
    _, op = ggn.full_operator(x, y)
    v = torch.randn(op.shape[0], device="cuda", dtype=op.dtype)
    outs = [op @ v for _ in range(3)]
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-10, atol=1e-12)
    assert _slots(op)[(1, op.shape[0])].replay is not None, _slots(op)[(1, op.shape[0])].error
    ggn.kron(x, y, len(x))  # draws on the device
