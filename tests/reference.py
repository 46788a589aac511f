"""Dense float64 brute-force references, written independently of curvop's machinery.

Per-sample Jacobians and gradients come from ``torch.autograd.grad`` in Python loops, the Hessian
from differentiating every gradient entry again, Λ from its textbook formula.
"""

from __future__ import annotations

import torch
from torch import nn

from curvop import FeatureExtractor


def selected_params(model: nn.Module, last_layer: bool) -> list[torch.Tensor]:
    # the last layer is found the way curvop finds it (its own test checks that choice)
    module = FeatureExtractor(model).last_layer if last_layer else model
    return [p for p in module.parameters() if p.requires_grad]


def loss_fn(likelihood: str, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if likelihood == "classification":
        return torch.nn.functional.cross_entropy(f, y, reduction="sum")
    return 0.5 * ((f - y) ** 2).sum()


def _flat_grad(out: torch.Tensor, params, create_graph=False) -> torch.Tensor:
    gs = torch.autograd.grad(out, params, allow_unused=True, create_graph=create_graph,
                             retain_graph=True)
    return torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten()
                      for g, p in zip(gs, params)])


def jacobians(model, x, last_layer=False):
    """`(B, C, P)` and `(B, C)` by looping over samples and outputs."""
    params = selected_params(model, last_layer)
    Js, fs = [], []
    for n in range(x.shape[0]):
        f = model(x[n : n + 1])[0]
        Js.append(torch.stack([_flat_grad(f[c], params) for c in range(f.shape[0])]))
        fs.append(f.detach())
    return torch.stack(Js), torch.stack(fs)


def gradients(model, x, y, likelihood, last_layer=False):
    params = selected_params(model, last_layer)
    return torch.stack([
        _flat_grad(loss_fn(likelihood, model(x[n : n + 1]), y[n : n + 1]), params)
        for n in range(x.shape[0])
    ])


def output_hessian(f, likelihood):
    if likelihood == "regression":
        return torch.eye(f.shape[1], dtype=f.dtype, device=f.device).expand(f.shape[0], -1, -1)
    p = torch.softmax(f, -1)
    return torch.stack([torch.diag(pn) - torch.outer(pn, pn) for pn in p])


def ggn(model, x, y, likelihood, last_layer=False):
    J, f = jacobians(model, x, last_layer)
    L = output_hessian(f, likelihood)
    return torch.einsum("bcp,bcd,bdq->pq", J, L, J)


def ef(model, x, y, likelihood, last_layer=False):
    G = gradients(model, x, y, likelihood, last_layer)
    return G.T @ G


def hessian(model, x, y, likelihood, last_layer=False):
    params = selected_params(model, last_layer)
    g = _flat_grad(loss_fn(likelihood, model(x), y), params, create_graph=True)
    rows = [_flat_grad(g[i], params) for i in range(g.numel())]
    return torch.stack(rows)


def loss(model, x, y, likelihood):
    with torch.no_grad():
        return loss_fn(likelihood, model(x), y)


CURVATURES = {"ggn": ggn, "ef": ef, "hessian": hessian}
