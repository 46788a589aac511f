"""Every backend × method × case against the dense float64 brute-force references."""

from __future__ import annotations

import copy

import pytest
import torch

from curvop.errors import NotSupportedError

import reference as ref
from cases import cases
from registry import BACKENDS, backend_ids, backend_kinds

CASES = cases(dtypes=(torch.float64, torch.float32))
OPTIONS = {"all": {}, "last_layer": {"last_layer": True}, "subnet": {"subnet": True}}

#: What a backend documents it cannot do, as data: (backend, model, option) -> the methods
#: ("jacobians", "gradients", "ggn.full", "ef.diag", ...; "*" for all) that must raise
#: NotSupportedError pointing at an alternative. Asserted, never skipped; anything not listed
#: must match the references.
UNSUPPORTED: dict[tuple[str, str, str], set[str]] = {
    # BackPACK has no extension for LayerNorm, which owns selected parameters
    ("backpack", "layernorm_mlp", "all"): {"*"},
    ("backpack", "layernorm_mlp", "subnet"): {"*"},  # the subnetwork includes LayerNorm entries
    # TwoPath owns the elementwise `scale` itself: a custom module BackPACK cannot follow
    ("backpack", "two_path", "all"): {"*"},
    ("backpack", "two_path", "subnet"): {"*"},  # the subnetwork includes `scale` entries
    # a subnetwork of head.bias's last entry: BackPACK's second-order pass needs the whole chain
    ("backpack", "two_path", "last_entry"): {"ggn.diag"},
    # ASDL sees parameters only through the hooks of the layers it knows: TwoPath's own `scale`
    # is out of reach, except for the Hessian's `full` (plain autograd)
    ("asdl", "two_path", "all"): {"jacobians", "gradients", "ggn.full", "ggn.diag", "ef.full",
                                  "ef.diag", "hessian.diag"},
    ("asdl", "two_path", "subnet"): {"jacobians", "gradients", "ggn.full", "ggn.diag",
                                     "ef.full", "ef.diag", "hessian.diag"},  # include `scale`
}


def unsupported(backend: str, model_name: str, option: str, method: str) -> bool:
    """Whether ``UNSUPPORTED`` says ``method`` must raise for this combination."""
    methods = UNSUPPORTED.get((backend, model_name, option), set())
    return "*" in methods or method in methods


def assert_unsupported(method, *args) -> None:
    """``method(*args)`` raises a NotSupportedError that names an alternative backend."""
    with pytest.raises(NotSupportedError, match="use .*Torch"):
        method(*args)


def _subnet(model, last_layer: bool, seed: int = 1) -> torch.Tensor:
    P = sum(p.numel() for p in ref.selected_params(model, last_layer))
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(P, generator=g)[: max(2, P // 3)]


def _setup(case, backend, kind, option):
    model, x, y = case.build()
    last_layer = OPTIONS[option].get("last_layer", False)
    idx = _subnet(model, last_layer) if OPTIONS[option].get("subnet") else None
    cls = BACKENDS[backend][kind]
    iface = cls(model, case.likelihood, last_layer=last_layer, subnetwork_indices=idx)
    return model, x, y, iface, last_layer, idx


def _sub(H, idx):
    """Submatrix of a curvature `(P, P)` on the subnetwork."""
    return H if idx is None else H[idx][:, idx]


def _cols(T, idx):
    """The subnetwork's entries along the last dimension."""
    return T if idx is None else T[..., idx]


def _double(model, x, y):
    """A float64 copy of the problem for the references (the user's model is left alone)."""
    y = y.double() if y.is_floating_point() else y
    return copy.deepcopy(model).double(), x.double(), y


def _close(actual, expected, case):
    assert actual.dtype == case.dtype
    assert actual.device.type == case.device
    torch.testing.assert_close(actual, expected.to(actual.dtype), **case.tol())


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("backend,kind", backend_kinds())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_full_and_diag(case, backend, kind, option):
    model, x, y, iface, last_layer, idx = _setup(case, backend, kind, option)
    full_fails = unsupported(backend, case.model_name, option, f"{kind}.full")
    diag_fails = unsupported(backend, case.model_name, option, f"{kind}.diag")
    if full_fails:
        assert_unsupported(iface.full, x, y)
    if diag_fails:
        assert_unsupported(iface.diag, x, y)
    if full_fails and diag_fails:
        return
    H_ref = _sub(ref.CURVATURES[kind](*_double(model, x, y), case.likelihood, last_layer), idx)
    if not full_fails:
        loss, H = iface.full(x, y)
        _close(H, H_ref, case)
        torch.testing.assert_close(loss, ref.loss(model, x, y, case.likelihood))
        assert torch.allclose(H, H.T, **case.tol())
        if "_full_operator" in type(iface).supports:
            _, op = iface.full_operator(x, y)
            _close(op.to_dense(), H_ref, case)
            v = torch.ones(H_ref.shape[0], dtype=case.dtype, device=x.device)
            _close(op @ v, H_ref.to(case.dtype) @ v, case)
    if not diag_fails:
        loss, h = iface.diag(x, y)
        _close(h, H_ref.diagonal(), case)
        torch.testing.assert_close(loss, ref.loss(model, x, y, case.likelihood))


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("backend", backend_ids())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_jacobians_and_gradients(case, backend, option):
    model, x, y, iface, last_layer, idx = _setup(case, backend, "ggn", option)
    if unsupported(backend, case.model_name, option, "jacobians"):
        assert_unsupported(iface.jacobians, x)
    else:
        J_ref, f_ref = ref.jacobians(*_double(model, x, y)[:2], last_layer)
        Js, f = iface.jacobians(x)
        assert Js.shape == (x.shape[0], iface.num_params, f_ref.shape[1])  # (B, P, C)
        _close(Js, _cols(J_ref, idx).transpose(1, 2), case)
        _close(f, f_ref, case)
    if unsupported(backend, case.model_name, option, "gradients"):
        assert_unsupported(iface.gradients, x, y)
        return
    loss, Gs = iface.gradients(x, y)
    assert loss.dim() == 0
    _close(Gs, _cols(ref.gradients(*_double(model, x, y), case.likelihood, last_layer), idx), case)
    torch.testing.assert_close(loss, ref.loss(model, x, y, case.likelihood))


@pytest.mark.parametrize("backend", backend_ids())
@pytest.mark.parametrize("case", cases(dtypes=(torch.float64,)), ids=lambda c: c.id)
def test_last_layer_jacobians(case, backend):
    model, x, y = case.build()
    iface = BACKENDS[backend]["ggn"](model, case.likelihood)
    J_ref, f_ref = ref.jacobians(model, x, last_layer=True)
    Js, f = iface.last_layer_jacobians(x)
    _close(Js, J_ref.transpose(1, 2), case)
    _close(f, f_ref, case)
