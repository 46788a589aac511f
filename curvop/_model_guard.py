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


def _hook_names(attrs: dict) -> list[str]:
    """Names of the hook dictionaries among a module's attributes (torch's and backends')."""
    return [k for k in attrs if "hooks" in k and isinstance(attrs[k], dict)]


class ModelSnapshot:
    """What :func:`model_guard` records: hooks, attributes, modes, grads, flags and buffers.

    Taken and restored around every call of every method, so both are kept to plain dict and
    list operations: a module's attributes are one ``dict.copy``, a hook dictionary's keys are
    kept only where it has any, and unchanged things are skipped by identity.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.attrs = [m.__dict__.copy() for m in self.modules]
        self.hook_names = [_hook_names(a) for a in self.attrs]
        self.hooks = [{k: set(a[k]) for k in names if a[k]}
                      for a, names in zip(self.attrs, self.hook_names)]
        self.training = [m.training for m in self.modules]
        params = {id(p): p for mod in self.modules for p in mod._parameters.values()
                  if p is not None}  # what model.parameters() gives, without its traversal
        self.params = list(params.values())
        self.param_attrs = [p.__dict__.copy() if p.__dict__ else None for p in self.params]
        self.grads = [p.grad for p in self.params]
        self.grad_values = [None if g is None else g.detach().clone() for g in self.grads]
        # an in-place write bumps a tensor's version: unchanged grads need no copy back
        self.grad_versions = [None if g is None else g._version for g in self.grads]
        self.requires_grad = [p.requires_grad for p in self.params]
        self.buffers = [(m, k, b, b.detach().clone()) for m in self.modules if m._buffers
                        for k, b in m._buffers.items() if b is not None]

    def restore(self) -> None:
        """Undo every change made since the snapshot."""
        for m, attrs, names, hooks, training in zip(self.modules, self.attrs, self.hook_names,
                                                    self.hooks, self.training):
            now = m.__dict__
            for k in _hook_names(now) if now.keys() != attrs.keys() else names:
                d = now[k]
                if not d:  # nothing was added (removed hooks cannot be put back anyway)
                    continue
                keep = hooks.get(k)
                if keep is None:
                    d.clear()
                elif len(d) != len(keep) or any(h not in keep for h in d):
                    for hk in [h for h in d if h not in keep]:
                        del d[hk]
            if now.keys() != attrs.keys():
                for k in [k for k in now if k not in attrs]:
                    delattr(m, k)
            for k, v in attrs.items():  # values rebound in place (e.g. hook flags)
                if now.get(k) is not v:
                    now[k] = v
            if m.training is not training:
                m.training = training
        for p, attrs, g, gv, version, rg in zip(self.params, self.param_attrs, self.grads,
                                                self.grad_values, self.grad_versions,
                                                self.requires_grad):
            if p.__dict__ or attrs:
                for k in [k for k in p.__dict__ if attrs is None or k not in attrs]:
                    delattr(p, k)
            if p.requires_grad is not rg:
                p.requires_grad_(rg)
            if g is None:
                if p.grad is not None:
                    p.grad = None
            else:
                if g._version != version:
                    with torch.no_grad():
                        g.copy_(gv)
                if p.grad is not g:
                    p.grad = g
        if not self.buffers:
            return
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
