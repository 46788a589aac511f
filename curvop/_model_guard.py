"""A context manager that leaves the user's model exactly as it found it.

Backends (BackPACK, ASDL, our own layer taps) register hooks, set attributes on modules and
parameters, write ``.grad`` and may update buffers. :func:`model_guard` snapshots all of that on
entry and restores it on exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["model_guard", "ModelSnapshot"]


def _hook_dicts(module: nn.Module) -> dict[str, dict]:
    return {
        k: v for k, v in vars(module).items()
        if "hooks" in k and isinstance(v, dict)
    }


class ModelSnapshot:
    """What :func:`model_guard` records: hooks, attributes, modes, grads, flags and buffers."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.attrs = [dict(vars(m)) for m in self.modules]
        self.hooks = [{k: set(d) for k, d in _hook_dicts(m).items()} for m in self.modules]
        self.training = [m.training for m in self.modules]
        self.params = list({id(p): p for p in model.parameters(recurse=True)}.values())
        self.param_attrs = [set(vars(p)) for p in self.params]
        self.grads = [p.grad for p in self.params]
        self.grad_values = [None if g is None else g.detach().clone() for g in self.grads]
        self.requires_grad = [p.requires_grad for p in self.params]
        self.buffers = [(m, k, b, b.detach().clone()) for m in self.modules
                        for k, b in m._buffers.items() if b is not None]

    def restore(self) -> None:
        """Undo every change made since the snapshot."""
        for m, attrs, hooks, training in zip(self.modules, self.attrs, self.hooks, self.training):
            for k, d in _hook_dicts(m).items():
                keep = hooks.get(k, set())
                for hk in [h for h in d if h not in keep]:
                    del d[hk]
            now = vars(m)
            for k in [k for k in now if k not in attrs]:
                delattr(m, k)
            for k, v in attrs.items():  # values rebound in place (e.g. hook flags)
                if now.get(k) is not v:
                    now[k] = v
            if m.training is not training:
                m.training = training
        for p, attrs, g, gv, rg in zip(self.params, self.param_attrs, self.grads,
                                       self.grad_values, self.requires_grad):
            for k in [k for k in vars(p) if k not in attrs]:
                delattr(p, k)
            if p.requires_grad is not rg:
                p.requires_grad_(rg)
            if g is None:
                p.grad = None
            else:
                with torch.no_grad():
                    g.copy_(gv)
                p.grad = g
        with torch.no_grad():
            for m, k, b, value in self.buffers:
                if m._buffers.get(k) is not b:
                    m._buffers[k] = b
                if not torch.equal(b, value):
                    b.copy_(value)


@contextlib.contextmanager
def model_guard(model: nn.Module) -> Iterator[ModelSnapshot]:
    """Restore ``model`` (hooks, attributes, ``training``, ``.grad``, buffers) on exit.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> with model_guard(net):
        ...     _ = net.register_forward_hook(lambda *a: None)
        >>> len(net._forward_hooks)
        0
    """
    snap = ModelSnapshot(model)
    try:
        yield snap
    finally:
        snap.restore()
