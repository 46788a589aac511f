"""SPEC §7: every bad input raises a clear error naming the argument, before any big work,
and the model is left exactly as it was (checked by the autouse fixture)."""

from __future__ import annotations

import time

import pytest
import torch

import curvop
from curvop.errors import InputError, InputTypeError, MemoryBudgetError, NotSupportedError

from cases import Case, register
from registry import BACKENDS, backend_ids


@pytest.fixture
def clf():
    return Case("tanh_mlp", "classification").build()


@pytest.fixture
def reg():
    return Case("tanh_mlp", "regression").build()


@pytest.mark.parametrize("backend", backend_ids())
def test_wrong_likelihood(backend, clf):
    with pytest.raises(ValueError, match="`likelihood` must be 'classification' or 'regression'"):
        BACKENDS[backend]["ggn"](clf[0], "poisson")


def test_model_type():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        curvop.TorchGGN(lambda x: x, "regression")


def test_flag_types(clf):
    with pytest.raises(TypeError, match="`last_layer` must be a bool"):
        curvop.TorchGGN(clf[0], "classification", last_layer="yes")
    with pytest.raises(TypeError, match="`stochastic` must be a bool"):
        curvop.TorchGGN(clf[0], "classification", stochastic=1)
    with pytest.raises(TypeError, match="`generator` must be a torch.Generator"):
        curvop.TorchGGN(clf[0], "classification", stochastic=True, generator=0)
    with pytest.raises(ValueError, match="`num_samples` must be a positive int"):
        curvop.TorchGGN(clf[0], "classification", stochastic=True, num_samples=0)


@pytest.mark.parametrize("backend", backend_ids())
@pytest.mark.parametrize("method", ["full", "diag", "gradients"])
def test_batch_size_mismatch(backend, method, clf):
    model, x, y = clf
    iface = BACKENDS[backend]["ggn"](model, "classification")
    with pytest.raises(ValueError, match="same batch size; `x` has 6, `y` has batch size 5"):
        getattr(iface, method)(x, y[:5])


@pytest.mark.parametrize("backend", backend_ids())
def test_label_out_of_range(backend, clf):
    model, x, y = clf
    y = y.clone()
    y[2] = 3
    with pytest.raises(ValueError, match=r"class label 3 out of range \[0, 3\)"):
        BACKENDS[backend]["ggn"](model, "classification").full(x, y)
    y[2] = -1
    with pytest.raises(ValueError, match=r"class label -1 out of range"):
        BACKENDS[backend]["ef"](model, "classification").diag(x, y)


def test_label_dtype_and_regression_shape(clf, reg):
    model, x, y = clf
    with pytest.raises(TypeError, match="`y` must hold integer class labels"):
        curvop.TorchGGN(model, "classification").diag(x, y.double())
    model, x, y = reg
    with pytest.raises(ValueError, match=r"`y` must have shape \(6, 2\)"):
        curvop.TorchEF(model, "regression").diag(x, y[:, :1])
    with pytest.raises(TypeError, match="`y` must be a floating tensor"):
        curvop.TorchEF(model, "regression").diag(x, y.long())


@pytest.mark.parametrize("backend", backend_ids())
def test_non_finite_inputs_and_parameters(backend, reg):
    model, x, y = reg
    iface = BACKENDS[backend]["ggn"](model, "regression")
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="`x` holds non-finite values"):
        iface.diag(bad, y)
    bad = y.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="`y` holds non-finite values"):
        iface.full(x, bad)
    with pytest.raises(TypeError, match="`x` must be a torch.Tensor"):
        iface.jacobians(x.numpy())
    model2, x2, y2 = Case("tanh_mlp", "regression").build()
    with torch.no_grad():
        model2[0].weight[0, 0] = float("nan")
    register(model2)  # snapshot after the deliberate change
    with pytest.raises(ValueError, match=r"parameter '0.weight' of `model` holds non-finite"):
        BACKENDS[backend]["ggn"](model2, "regression").diag(x2, y2)


@pytest.mark.parametrize("backend", backend_ids())
def test_bad_subnetwork_indices(backend, clf):
    model = clf[0]
    cls = BACKENDS[backend]["ggn"]
    P = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=rf"in \[0, {P}\); got \[{P}\] at positions \[1\]"):
        cls(model, "classification", subnetwork_indices=torch.tensor([0, P]))
    with pytest.raises(ValueError, match=r"unique indices .* duplicates at positions \[0, 2\]"):
        cls(model, "classification", subnetwork_indices=torch.tensor([3, 1, 3]))
    with pytest.raises(TypeError, match="`subnetwork_indices` must hold integers"):
        cls(model, "classification", subnetwork_indices=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="`subnetwork_indices` must be a 1-D torch.LongTensor"):
        cls(model, "classification", subnetwork_indices=[0, 1])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        cls(model, "classification", subnetwork_indices=torch.tensor([[0, 1]]))


@pytest.mark.parametrize("backend", backend_ids())
def test_full_too_big_fails_fast(backend):
    model = register(torch.nn.Linear(1000, 1000).double())  # ~1e6 parameters: P x P = 8 TB
    x, y = torch.randn(2, 1000), torch.randn(2, 1000)
    iface = BACKENDS[backend]["ggn"](model, "regression")
    start = time.perf_counter()
    with pytest.raises(MemoryError, match=r"the full curvature of shape \(1001000, 1001000\)"):
        iface.full(x.double(), y.double())
    assert time.perf_counter() - start < 0.5
    small = BACKENDS[backend]["ggn"](model, "regression", max_bytes=1000)
    with pytest.raises(MemoryBudgetError, match="allowed by max_bytes"):
        small.jacobians(x.double())


def test_kron_not_yet_supported_is_clear(clf):
    model, x, y = clf
    if "_kron" in curvop.TorchHessian.supports:
        pytest.skip("TorchHessian has kron")
    with pytest.raises(NotSupportedError, match="TorchHessian does not support `kron`"):
        curvop.TorchHessian(model, "classification").kron(x, y, N=6)


def test_output_shape_error():
    model = register(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Flatten(0)))
    with pytest.raises(ValueError, match=r"output must have shape \(batch, outputs\)"):
        curvop.TorchGGN(model, "regression").jacobians(torch.randn(4, 3))


def test_errors_are_curvop_subclasses():
    assert issubclass(InputError, ValueError) and issubclass(InputTypeError, TypeError)
    assert issubclass(MemoryBudgetError, MemoryError)
    assert issubclass(NotSupportedError, NotImplementedError)


def test_finiteness_check_tells_overflow_from_nan_and_inf():
    """The summing fast path of the finiteness checks: a sum that overflows is not an error."""
    from curvop._checks import all_finite, check_finite_parameters

    huge = torch.full((4,), 3e38)  # finite, but the float32 sum overflows to inf
    assert not torch.isfinite(huge.sum())
    assert all_finite(huge)
    assert all_finite(torch.tensor([1, 2, 3]))  # integers are always finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.ones(5)
        t[2] = bad
        assert not all_finite(t)
    t = torch.ones(5)
    t[0], t[1] = float("inf"), -float("inf")  # cancels to nan, still caught
    assert not all_finite(t)
    named = [("a", huge), ("b", torch.ones(3, dtype=torch.float64))]
    check_finite_parameters([t for _, t in named], lambda: named)  # mixed dtypes, overflow
    check_finite_parameters([t for _, t in named], lambda: named, x=huge)
    nan = torch.ones(3)
    nan[1] = float("nan")
    named = [("a", huge), ("b", nan), ("c", torch.ones(2))]
    with pytest.raises(ValueError, match=r"parameter 'b' of `model` holds non-finite"):
        check_finite_parameters([t for _, t in named], lambda: named)
    with pytest.raises(ValueError, match=r"parameter 'b' of `model` holds non-finite"):
        check_finite_parameters([t for _, t in named], lambda: named, x=huge)
    with pytest.raises(ValueError, match="`x` holds non-finite values"):  # x is named first
        check_finite_parameters([t for _, t in named], lambda: named, x=nan)
    with pytest.raises(ValueError, match="`x` holds non-finite values"):
        curvop.TorchGGN(torch.nn.Linear(4, 2), "classification").diag(
            torch.full((3, 4), -3e38).index_put_((torch.tensor([2]), torch.tensor([3])),
                                                  torch.tensor(float("inf"))),
            torch.zeros(3, dtype=torch.long))


def test_forbid_randomness_restores_the_generator():
    """A draw raises and is undone; another error raised after a draw propagates unchanged,
    with the draw undone too; a body without draws leaves the state as it was."""
    from curvop._checks import forbid_randomness

    cpu = torch.device("cpu")
    before = torch.get_rng_state()
    with pytest.raises(NotSupportedError, match="random numbers"):
        with forbid_randomness(cpu):
            torch.rand(3)
    assert torch.equal(before, torch.get_rng_state())
    with pytest.raises(KeyError, match="other"):
        with forbid_randomness(cpu):
            torch.rand(3)
            raise KeyError("other")
    assert torch.equal(before, torch.get_rng_state())
    with forbid_randomness(cpu):
        torch.ones(3).sum()
    assert torch.equal(before, torch.get_rng_state())
    expected = torch.rand(2)  # the user's next draw is the one they would have had
    torch.set_rng_state(before)
    assert torch.equal(torch.rand(2), expected)
