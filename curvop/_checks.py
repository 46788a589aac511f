"""Every validation of user input, each raising before any large allocation.

Each checker names the argument, what was expected and what came. They raise the subclasses of
:mod:`curvop.errors` (which are ``ValueError`` / ``TypeError`` / ``MemoryError`` too).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from curvop.errors import InputError, InputTypeError, MemoryBudgetError, NotSupportedError
from curvop.likelihoods import Likelihood

__all__ = [
    "check_likelihood",
    "check_model",
    "check_inputs",
    "check_targets",
    "check_outputs",
    "check_finite_parameters",
    "check_no_batch_coupling",
    "check_subnetwork_indices",
    "check_vector",
    "check_fits",
    "check_positive_int",
    "available_bytes",
]


def check_likelihood(likelihood: object) -> Likelihood:
    """Parse ``likelihood`` into a :class:`Likelihood`.

    Raises:
        InputError: If it is not ``'classification'`` or ``'regression'``.
    """
    if isinstance(likelihood, Likelihood):
        return likelihood
    try:
        return Likelihood(likelihood)
    except ValueError:
        raise InputError(
            f"`likelihood` must be 'classification' or 'regression'; got {likelihood!r}"
        ) from None


def check_model(model: object) -> nn.Module:
    """Check ``model`` is a ``torch.nn.Module`` with finite trainable parameters.

    Raises:
        InputTypeError: If ``model`` is not an ``nn.Module``.
        InputError: If it has no trainable parameter.
    """
    if not isinstance(model, nn.Module):
        raise InputTypeError(f"`model` must be a torch.nn.Module; got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError("`model` has no parameter with requires_grad=True")
    return model


def check_positive_int(value: object, name: str) -> int:
    """Check ``value`` is a positive ``int`` (not a bool).

    Raises:
        InputTypeError: If it is not an integer.
        InputError: If it is smaller than 1.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"`{name}` must be a positive int; got {type(value).__name__}")
    if value < 1:
        raise InputError(f"`{name}` must be a positive int; got {value}")
    return value


def check_inputs(x: object, device: torch.device | None = None) -> Tensor:
    """Check the input batch ``x``: a finite tensor with a batch dimension.

    Raises:
        InputTypeError: If ``x`` is not a tensor.
        InputError: If it has no batch dimension, is empty, non-finite or on another device.
    """
    if not isinstance(x, Tensor):
        raise InputTypeError(f"`x` must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise InputError(f"`x` must have a non-empty batch dimension; got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise InputError(f"`x` must be on the model's device {device}; got {x.device}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise InputError("`x` holds non-finite values (nan or inf)")
    return x


def check_outputs(f: Tensor, likelihood: Likelihood) -> None:
    """Check the model's outputs have shape `(B, C)` and are finite.

    Raises:
        InputError: If the output is not 2-D or not finite.
    """
    if f.dim() != 2:
        raise InputError(
            f"the model's output must have shape (batch, outputs); got {tuple(f.shape)} "
            f"(for {likelihood.value})"
        )
    if not torch.isfinite(f).all():
        raise InputError("the model's output holds non-finite values (nan or inf)")


def check_targets(y: object, batch_size: int, num_outputs: int, likelihood: Likelihood) -> Tensor:
    """Check the targets ``y`` against the batch size and the output size.

    Classification wants integer labels `(B,)` in ``[0, C)``; regression wants finite floats of
    shape `(B, C)` (`(B,)` is accepted when ``C == 1`` and reshaped).

    Raises:
        InputTypeError: If ``y`` is not a tensor or has the wrong dtype kind.
        InputError: If its batch size, shape, range or finiteness is wrong.
    """
    if not isinstance(y, Tensor):
        raise InputTypeError(f"`y` must be a torch.Tensor; got {type(y).__name__}")
    if y.dim() == 0 or y.shape[0] != batch_size:
        got = "a scalar" if y.dim() == 0 else f"batch size {y.shape[0]}"
        raise InputError(f"`x` and `y` must have the same batch size; `x` has {batch_size}, "
                         f"`y` has {got}")
    if likelihood is Likelihood.CLASSIFICATION:
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise InputTypeError(
                f"`y` must hold integer class labels for classification; got dtype {y.dtype}"
            )
        if y.dim() != 1:
            raise InputError(f"`y` must have shape (batch,) for classification; "
                             f"got {tuple(y.shape)}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_outputs:
            bad = lo if lo < 0 else hi
            raise InputError(
                f"`y` holds class label {bad} out of range [0, {num_outputs}) for a model "
                f"with {num_outputs} outputs"
            )
        return y.long()
    if not y.is_floating_point():
        raise InputTypeError(f"`y` must be a floating tensor for regression; got {y.dtype}")
    if y.dim() == 1 and num_outputs == 1:
        y = y.unsqueeze(-1)
    if tuple(y.shape) != (batch_size, num_outputs):
        raise InputError(f"`y` must have shape {(batch_size, num_outputs)} like the model's "
                         f"output for regression; got {tuple(y.shape)}")
    if not torch.isfinite(y).all():
        raise InputError("`y` holds non-finite values (nan or inf)")
    return y


def check_no_batch_coupling(model: nn.Module) -> None:
    """Raise for modules whose output couples the samples of a batch (train-mode BatchNorm).

    Curvatures here are sums of per-sample terms; batch statistics break that decomposition.

    Raises:
        NotSupportedError: Naming the module and the fix (``model.eval()``).
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise NotSupportedError(
                f"module {name!r} ({type(m).__name__}) is in training mode, where its batch "
                "statistics couple the samples; call `model.eval()` first"
            )


def check_finite_parameters(named_params: Iterable[tuple[str, Tensor]]) -> None:
    """Raise if any parameter holds nan or inf.

    Raises:
        InputError: Naming the first offending parameter.
    """
    for name, p in named_params:
        if not torch.isfinite(p).all():
            raise InputError(f"parameter {name!r} of `model` holds non-finite values")


def check_subnetwork_indices(indices: object, num_params: int) -> Tensor | None:
    """Check ``subnetwork_indices``: a 1-D integer tensor of unique indices in ``[0, P)``.

    Raises:
        InputTypeError: If it is not an integer tensor.
        InputError: If it is not 1-D, empty, out of range, or holds duplicates.
    """
    if indices is None:
        return None
    if not isinstance(indices, Tensor):
        raise InputTypeError(
            f"`subnetwork_indices` must be a 1-D torch.LongTensor; got {type(indices).__name__}"
        )
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise InputTypeError(
            f"`subnetwork_indices` must hold integers (torch.long); got dtype {indices.dtype}"
        )
    if indices.dim() != 1 or indices.numel() == 0:
        raise InputError(f"`subnetwork_indices` must be a non-empty 1-D tensor; got shape "
                         f"{tuple(indices.shape)}")
    indices = indices.long().cpu()
    bad = ((indices < 0) | (indices >= num_params)).nonzero().flatten()
    if bad.numel():
        raise InputError(
            f"`subnetwork_indices` must hold indices in [0, {num_params}); got "
            f"{indices[bad[:5]].tolist()} at positions {bad[:5].tolist()}"
        )
    uniq, inverse, counts = torch.unique(indices, return_inverse=True, return_counts=True)
    if (counts > 1).any():
        dup_pos = (counts[inverse] > 1).nonzero().flatten()
        raise InputError(
            f"`subnetwork_indices` must hold unique indices in [0, {num_params}); got duplicates "
            f"at positions {dup_pos[:6].tolist()}"
        )
    return indices


def check_vector(v: object, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Check a right-hand side of a product: `(P,)`, `(P, k)` or `(*b, P, k)`.

    Raises:
        InputTypeError: If ``v`` is not a tensor or has another dtype.
        InputError: If its parameter dimension is not ``size`` or it is on another device.
    """
    if not isinstance(v, Tensor):
        raise InputTypeError(f"the vector must be a torch.Tensor; got {type(v).__name__}")
    dim = 0 if v.dim() == 1 else -2
    if v.dim() == 0 or v.shape[dim] != size:
        raise InputError(f"the vector must have {size} rows (one per parameter); got shape "
                         f"{tuple(v.shape)}")
    if v.device != device:
        raise InputError(f"the vector must be on the operator's device {device}; got {v.device}")
    if v.dtype != dtype:
        raise InputTypeError(f"the vector must have the operator's dtype {dtype}; got {v.dtype}")
    return v


def available_bytes(device: torch.device) -> int:
    """Memory free on ``device`` right now (CUDA: ``mem_get_info``; CPU: available RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_fits(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, what: str,
               max_bytes: int | None = None) -> None:
    """Raise before allocating a result of ``shape`` that cannot fit.

    The limit is ``max_bytes`` when given, else the memory available on ``device``.

    Raises:
        MemoryBudgetError: If the result alone needs more bytes than the limit.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    need = numel * torch.empty((), dtype=dtype).element_size()
    limit = max_bytes if max_bytes is not None else available_bytes(device)
    if need > limit:
        raise MemoryBudgetError(
            f"{what} of shape {tuple(shape)} ({dtype}) needs {need / 2**30:.2f} GiB, more than "
            f"the {limit / 2**30:.2f} GiB {'allowed by max_bytes' if max_bytes else 'free'} on "
            f"{device}; use a lazy operator (full_operator / diag / kron) or a subnetwork"
        )
