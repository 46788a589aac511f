"""Parameter selection (all / last layer / subnetwork), flattening and unflattening.

The selected vector of a curvature is, by SPEC §3, ``model.parameters()`` order (trainable only),
each tensor flattened row-major; with ``last_layer=True`` only the last layer's; with
``subnetwork_indices`` only those entries, in the given order.

A :class:`ParameterSelection` splits this into *live* tensors — the parameter tensors that hold at
least one selected entry, the only ones the backends differentiate — and an optional ``index``
into the concatenation of the live tensors. Backends compute on the live vector (`P_live`) and the
interface applies ``index`` once, at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from curvop._checks import check_subnetwork_indices

__all__ = ["ParameterSelection", "trainable_named_parameters"]


def trainable_named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``module.named_parameters()`` restricted to ``requires_grad`` ones, in order."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class ParameterSelection:
    """Which entries of which parameters of ``module`` a curvature is taken over.

    Args:
        module: The module whose parameters are selected (the model, or its last layer).
        subnetwork_indices: Optional 1-D ``LongTensor`` of unique indices into the flattened
            trainable parameters of ``module``.

    Attributes:
        names: Names (relative to ``module``) of the live parameter tensors.
        params: The live parameter tensors themselves (the user's, never modified).
        index: ``None`` or a ``LongTensor`` into the live flat vector, on the parameters' device.
        num_params: ``P``, the number of selected entries.
        num_live: ``P_live``, the length of the live flat vector.

    Raises:
        InputError: If ``subnetwork_indices`` is out of range or holds duplicates.
        InputTypeError: If ``subnetwork_indices`` is not an integer tensor.
    """

    def __init__(self, module: nn.Module, subnetwork_indices: Tensor | None = None) -> None:
        named = trainable_named_parameters(module)
        total = sum(p.numel() for _, p in named)
        indices = check_subnetwork_indices(subnetwork_indices, total)
        self.module = module
        self.total = total
        if indices is None:
            live = named
            self.index = None
        else:
            offsets = torch.tensor([0] + [p.numel() for _, p in named]).cumsum(0)
            owner = torch.bucketize(indices, offsets[1:], right=True)
            keep = sorted(set(owner.tolist()))
            live = [named[i] for i in keep]
            # shift each index from the all-parameter vector to the live vector
            live_offsets = torch.zeros(len(named), dtype=torch.long)
            start = 0
            for i in keep:
                live_offsets[i] = start
                start += named[i][1].numel()
            index = indices - offsets[owner] + live_offsets[owner]
            self.index = None if torch.equal(index, torch.arange(start)) else index
        self.names = [n for n, _ in live]
        self.params = [p for _, p in live]
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.num_live = sum(self.numels)
        self.num_params = self.num_live if indices is None else int(indices.numel())
        if self.index is not None and self.params:
            self.index = self.index.to(self.params[0].device)

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters."""
        return self.params[0].dtype

    def detached(self) -> list[Tensor]:
        """Detached views of the live parameters (safe to differentiate functionally)."""
        return [p.detach() for p in self.params]

    def flatten(self, tensors: Sequence[Tensor], batch_dims: int = 0) -> Tensor:
        """Concatenate per-parameter tensors into the live vector, `(*batch, P_live)`."""
        return torch.cat([t.reshape(*t.shape[:batch_dims], -1) for t in tensors], dim=-1)

    def unflatten(self, vec: Tensor) -> list[Tensor]:
        """Split a live vector `(*batch, P_live)` into per-parameter tensors."""
        batch = vec.shape[:-1]
        return [c.reshape(*batch, *s) for c, s in zip(vec.split(self.numels, dim=-1), self.shapes)]

    def select(self, t: Tensor, dim: int = -1) -> Tensor:
        """Restrict dimension ``dim`` of ``t`` (of length `P_live`) to the selected entries."""
        if self.index is None:
            return t
        return t.index_select(dim, self.index)

    def embed(self, v: Tensor, dim: int = -1) -> Tensor:
        """Scatter selected entries ``v`` (length `P` along ``dim``) into a live vector of zeros."""
        if self.index is None:
            return v
        dim = dim % v.dim()
        shape = list(v.shape)
        shape[dim] = self.num_live
        out = v.new_zeros(shape)
        return out.index_copy(dim, self.index, v)
