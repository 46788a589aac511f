"""The guard and FeatureExtractor: the user's model is left exactly as it was."""

from __future__ import annotations

import pytest
import torch

import curvop
from curvop._model_guard import model_guard

from cases import Case, register


def test_guard_restores_everything_on_error():
    net = register(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).train())
    net[0].weight.grad = torch.ones_like(net[0].weight)
    register(net)
    with pytest.raises(RuntimeError, match="boom"), model_guard(net):
        net[0].register_forward_hook(lambda *a: None)
        net[1].register_full_backward_hook(lambda *a: None)
        net[0].weight.register_hook(lambda g: g)
        net[0].weight.grad_batch = torch.zeros(1)
        net[0]._backpack_extend = True
        net.eval()
        net[0].weight.grad.add_(5.0)
        net[1].bias.grad = torch.zeros(4)
        net(torch.randn(5, 3))
        net[1].running_mean.add_(3.0)
        raise RuntimeError("boom")
    assert net.training and net[1].training
    assert torch.equal(net[0].weight.grad, torch.ones_like(net[0].weight))
    # the conftest fixture checks hooks, attributes, grads and buffers


def test_guard_keeps_the_users_hooks_and_grads_and_removes_only_what_was_added():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
    calls = []
    net[0].register_forward_hook(lambda *a: calls.append(1))
    net[1].register_forward_pre_hook(lambda *a: None)
    grad = torch.full_like(net[0].bias, 2.0)
    net[0].bias.grad = grad
    before = dict(net[0]._forward_hooks)
    register(net)  # the conftest fixture compares the end state with this one
    with model_guard(net):
        net[0].register_forward_hook(lambda *a: None)
        net[0].register_forward_pre_hook(lambda *a, **k: None, with_kwargs=True)
        net[1].register_forward_hook(lambda *a: None)
        net[0].bias.grad = torch.zeros(4)  # a new tensor: the user's comes back, untouched
        net[0].weight.grad = torch.zeros(4, 3)
    assert dict(net[0]._forward_hooks) == before and not net[0]._forward_pre_hooks
    assert len(net[1]._forward_pre_hooks) == 1 and not net[1]._forward_hooks
    assert net[0].bias.grad is grad and torch.equal(grad, torch.full_like(grad, 2.0))
    assert net[0].weight.grad is None
    net(torch.randn(2, 3))
    assert calls == [1]


def test_train_mode_batchnorm_is_a_clear_error():
    case = Case("batchnorm_mlp", "regression")
    model, x, y = case.build()
    model.train()
    register(model)
    for cls in (curvop.TorchGGN, curvop.TorchEF, curvop.TorchHessian):
        with pytest.raises(NotImplementedError, match=r"module '1' \(BatchNorm1d\) is in training"):
            cls(model, "regression").diag(x, y)
    assert model.training


def test_feature_extractor_finds_last_layer():
    model, x, y = Case("two_path", "classification").build()
    fe = curvop.FeatureExtractor(model)
    assert fe.last_layer is model.head and fe.last_layer_name == "head"
    f, phi = fe.forward_with_features(x)
    torch.testing.assert_close(f, model(x))
    torch.testing.assert_close(model.head(phi), f)
    assert not model.head._forward_hooks


def test_feature_extractor_errors():
    model = register(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Softmax(-1)))
    fe = curvop.FeatureExtractor(model)
    with pytest.raises(ValueError, match="is not the model's output; pass `last_layer_name`"):
        fe.forward_with_features(torch.randn(4, 3))
    with pytest.raises(ValueError, match="`last_layer_name` 'fc' names no module"):
        curvop.FeatureExtractor(model, last_layer_name="fc")
    with pytest.raises(ValueError, match="is not the model's output"):
        curvop.TorchGGN(model, "regression", last_layer=True).jacobians(torch.randn(4, 3))


def test_shared_module_keeps_its_parameters():
    shared = torch.nn.Linear(4, 4).double()
    model = register(torch.nn.Sequential(shared, torch.nn.Tanh(), shared))
    w = shared.weight
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    iface = curvop.TorchGGN(model, "regression")
    _, H = iface.full(x, y)
    _, op = iface.full_operator(x, y)
    op @ torch.randn(H.shape[0], dtype=torch.float64)
    assert model[0].weight is w and model[2].weight is w
    assert isinstance(model[0].weight, torch.nn.Parameter)
    import reference as ref
    torch.testing.assert_close(H, ref.ggn(model, x, y, "regression"), rtol=1e-10, atol=1e-12)
