"""Every validation of user input, each raising before any large allocation.

Each checker names the argument, what was expected and what came. They raise the subclasses of
:mod:`curvop.errors` (which are ``ValueError`` / ``TypeError`` / ``MemoryError`` too).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

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
    "check_sequence_targets",
    "check_ignore_index",
    "check_deterministic",
    "forbid_randomness",
    "all_finite",
    "check_finite_parameters",
    "check_no_batch_coupling",
    "check_subnetwork_indices",
    "check_vector",
    "check_fits",
    "check_positive_int",
    "available_bytes",
    "check_square_operator",
]


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite (integer and bool tensors always are).

    One summing pass instead of the elementwise ``isfinite(t).all()`` (three passes and a mask):
    a nan or inf entry makes the sum non-finite. A non-finite sum can also be an overflow of
    finite entries, so only then are the entries checked one by one.
    """
    if not (t.is_floating_point() or t.is_complex()):
        return True
    total = t.detach().sum()
    # `math.isfinite(float(.))` reads the scalar once, without isfinite's four kernels
    finite = math.isfinite(float(total)) if t.is_floating_point() else bool(
        torch.isfinite(total))
    return finite or bool(torch.isfinite(t).all())


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


def check_inputs(x: object, device: torch.device | None = None, finite: bool = True) -> Tensor:
    """Check the input batch ``x``: a finite tensor with a batch dimension.

    With ``finite=False`` the caller checks finiteness itself (with the parameters:
    :func:`check_finite_parameters`).

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
    if finite and not all_finite(x):
        raise InputError("`x` holds non-finite values (nan or inf)")
    return x


def check_outputs(f: Tensor, likelihood: Likelihood, sequence: bool = False) -> None:
    """Check the model's outputs have shape `(B, C)` (or `(B, T, C)`) and are finite.

    Args:
        f: The outputs.
        likelihood: For the message.
        sequence: Accept token-level outputs `(B, T, C)` too.

    Raises:
        InputError: If the output has another rank or is not finite.
    """
    if f.dim() != 2 and not (sequence and f.dim() == 3):
        expected = ("(batch, outputs) or, token-level, (batch, seq, outputs)" if sequence
                    else "(batch, outputs)")
        raise InputError(
            f"the model's output must have shape {expected}; got {tuple(f.shape)} "
            f"(for {likelihood.value})"
        )
    if not all_finite(f):
        raise InputError("the model's output holds non-finite values (nan or inf)")


def _check_target_kind(y: object, batch_size: int, likelihood: Likelihood) -> None:
    """Type, batch size and (for classification) integer dtype of ``y``, for both target checks."""
    if not isinstance(y, Tensor):
        raise InputTypeError(f"`y` must be a torch.Tensor; got {type(y).__name__}")
    if y.dim() == 0 or y.shape[0] != batch_size:
        got = "a scalar" if y.dim() == 0 else f"batch size {y.shape[0]}"
        raise InputError(f"`x` and `y` must have the same batch size; `x` has {batch_size}, "
                         f"`y` has {got}")
    if likelihood is Likelihood.CLASSIFICATION and (
            y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
        raise InputTypeError(
            f"`y` must hold integer class labels for classification; got dtype {y.dtype}")


def check_targets(y: object, batch_size: int, num_outputs: int, likelihood: Likelihood) -> Tensor:
    """Check the targets ``y`` against the batch size and the output size.

    Classification wants integer labels `(B,)` in ``[0, C)``; regression wants finite floats of
    shape `(B, C)` (`(B,)` is accepted when ``C == 1`` and reshaped).

    Raises:
        InputTypeError: If ``y`` is not a tensor or has the wrong dtype kind.
        InputError: If its batch size, shape, range or finiteness is wrong.
    """
    _check_target_kind(y, batch_size, likelihood)
    if likelihood is Likelihood.CLASSIFICATION:
        if y.dim() != 1:
            raise InputError(f"`y` must have shape (batch,) for classification; "
                             f"got {tuple(y.shape)}")
        lo, hi = torch.stack(torch.aminmax(y)).tolist()  # one host synchronisation
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
    if not all_finite(y):
        raise InputError("`y` holds non-finite values (nan or inf)")
    return y


def check_sequence_targets(y: object, batch_size: int, tokens: int, num_outputs: int,
                           likelihood: Likelihood, ignore_index: int) -> Tensor:
    """Check the targets of token-level outputs `(B, T, C)`.

    Classification wants integer labels `(B, T)`, each in ``[0, C)`` or equal to
    ``ignore_index`` (a token that does not count); regression wants finite floats
    `(B, T, C)` (`(B, T)` when ``C == 1``), returned flattened to `(B, T·C)` like the outputs.

    Raises:
        InputTypeError: If ``y`` is not a tensor or has the wrong dtype kind.
        InputError: If its batch size, shape, range or finiteness is wrong.
    """
    _check_target_kind(y, batch_size, likelihood)
    if likelihood is Likelihood.CLASSIFICATION:
        if tuple(y.shape) != (batch_size, tokens):
            raise InputError(
                f"`y` must have shape {(batch_size, tokens)} (batch, seq) for token-level "
                f"classification of outputs (batch, seq, classes); got {tuple(y.shape)}")
        bad = ((y < 0) | (y >= num_outputs)) & (y != ignore_index)
        if bad.any():
            raise InputError(
                f"`y` holds class label {int(y[bad][0])} out of range [0, {num_outputs}) for a "
                f"model with {num_outputs} classes per token (and not `ignore_index` "
                f"{ignore_index})")
        return y.long()
    if not y.is_floating_point():
        raise InputTypeError(f"`y` must be a floating tensor for regression; got {y.dtype}")
    if y.dim() == 2 and num_outputs == 1:
        y = y.unsqueeze(-1)
    if tuple(y.shape) != (batch_size, tokens, num_outputs):
        raise InputError(f"`y` must have shape {(batch_size, tokens, num_outputs)} like the "
                         f"model's output for regression; got {tuple(y.shape)}")
    if not all_finite(y):
        raise InputError("`y` holds non-finite values (nan or inf)")
    return y.flatten(1)


def check_ignore_index(ignore_index: object) -> int:
    """Check ``ignore_index`` is an ``int`` (not a bool).

    Raises:
        InputTypeError: If it is not.
    """
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise InputTypeError(
            f"`ignore_index` must be an int (the label of tokens that do not count); got "
            f"{type(ignore_index).__name__}")
    return ignore_index


def _dropout_p(module: nn.Module) -> float:
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return float(module.p)
    if isinstance(module, nn.MultiheadAttention):
        return float(module.dropout)
    return 0.0


def check_deterministic(model: nn.Module) -> None:
    """Raise for dropout that is active (a module in training mode with ``p > 0``).

    With active dropout every evaluation of the model is a different random function, so a
    curvature (and the consistency between the products of one operator) is meaningless.
    Dropout in eval mode, or with ``p = 0`` in training mode, is fine. Randomness this static
    check cannot see (``F.dropout`` in a custom ``forward``) is caught by
    :func:`forbid_randomness` around the first forward.

    Raises:
        NotSupportedError: Naming the modules and the fix.
    """
    active = [f"{name or 'the model'} ({type(m).__name__}, p={_dropout_p(m)})"
              for name, m in model.named_modules() if m.training and _dropout_p(m) > 0]
    if active:
        shown = ", ".join(active[:4]) + (f" and {len(active) - 4} more" if len(active) > 4
                                          else "")
        raise NotSupportedError(
            f"dropout is active in training mode in {shown}: every forward pass would draw new "
            "masks, so the curvature would be random; call `model.eval()` (or set the dropout "
            "probabilities to 0) first")


@contextlib.contextmanager
def forbid_randomness(device: torch.device) -> Iterator[None]:
    """Raise if the body draws from torch's global generator (CPU, or ``device``'s on CUDA).

    The generators' states are restored on exit either way, so a check never consumes the
    user's random numbers.

    Raises:
        NotSupportedError: If the body drew random numbers (dropout in a custom ``forward``).
    """
    devices = [device] if device.type == "cuda" else []
    before = torch.get_rng_state()
    before_cuda = [torch.cuda.get_rng_state(d) for d in devices]

    def restore() -> None:
        torch.set_rng_state(before)
        for state, d in zip(before_cuda, devices):
            torch.cuda.set_rng_state(state, d)

    # what `torch.random.fork_rng` does, without its second copy of the states: an unchanged
    # state needs no restoring (this runs around every forward pass)
    try:
        yield
    except BaseException:
        restore()
        raise
    drew = not torch.equal(before, torch.get_rng_state()) or any(
        not torch.equal(b, torch.cuda.get_rng_state(d)) for b, d in zip(before_cuda, devices))
    if drew:
        restore()
        raise NotSupportedError(
            "the model's forward draws random numbers (dropout or noise active in training "
            "mode?), so the curvature would be random; call `model.eval()` or make the forward "
            "deterministic first")


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


def check_finite_parameters(params: Sequence[Tensor],
                            named: Callable[[], Iterable[tuple[str, Tensor]]],
                            x: Tensor | None = None) -> None:
    """Raise if the inputs ``x`` (if given) or any of ``params`` hold nan or inf.

    Args:
        params: The tensors to check (the model's trainable parameters).
        named: Gives ``(name, tensor)`` pairs of ``params``, to name an offender; called only
            when something is not finite.
        x: The input batch, checked in the same reduction.

    Raises:
        InputError: Naming ``x`` or the first offending parameter.
    """
    # the total L1 norm is non-finite if an entry is (see `all_finite`): one reduction per
    # tensor (one fused kernel per device and dtype on GPUs, `_foreach_norm`) and one host
    # synchronisation for the inputs and every parameter together; only a non-finite total
    # (or an overflow) sends us through the tensors one by one to name the offender
    tensors = [t.detach() for t in (params if x is None else (x, *params))
               if t.is_floating_point() or t.is_complex()]
    if not tensors:
        return
    first = tensors[0]
    if all(t.device == first.device and t.dtype == first.dtype for t in tensors):
        # the common case without `get_total_norm`'s grouping by device and dtype
        total = torch.stack(torch._foreach_norm(tensors, 1.0)).sum()
    else:
        total = torch.nn.utils.get_total_norm(tensors, 1.0)
    if math.isfinite(float(total.real)):
        return
    if x is not None and not all_finite(x):
        raise InputError("`x` holds non-finite values (nan or inf)")
    for name, p in named():
        if (p.is_floating_point() or p.is_complex()) and not torch.isfinite(p).all():
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


def check_square_operator(op: object, name: str = "op"):
    """Coerce ``op`` (a ``LinearOperator`` or a tensor) to a square `(P, P)` LinearOperator.

    Raises:
        InputTypeError: If ``op`` is neither a LinearOperator nor a tensor.
        InputError: If it is not a square 2-D operator.
    """
    from linear_operator.operators import LinearOperator, to_linear_operator

    if isinstance(op, Tensor):
        op = to_linear_operator(op)
    if not isinstance(op, LinearOperator):
        raise InputTypeError(f"`{name}` must be a linear_operator.LinearOperator or a tensor; "
                             f"got {type(op).__name__}")
    if op.dim() != 2 or op.shape[0] != op.shape[1]:
        raise InputError(f"`{name}` must be a square 2-D (P, P) operator; got shape "
                         f"{tuple(op.shape)}")
    return op


#: (time.monotonic() of the reading, bytes) of the last reading of the memory free, per device
_AVAILABLE: dict[torch.device, tuple[float, int]] = {}
#: seconds a reading is reused: reading /proc/meminfo costs about 50 us and a CUDA driver query
#: is not free either, a noticeable part of a small model's call, and these checks only guard
#: against requests far beyond the memory (one that a stale reading lets through is read again)
_AVAILABLE_TTL = 0.5


def available_bytes(device: torch.device, fresh: bool = False) -> int:
    """Memory free on ``device`` (CUDA: ``mem_get_info``; CPU: available RAM).

    A reading is reused for half a second unless ``fresh``.
    """
    now = time.monotonic()
    last = _AVAILABLE.get(device)
    if not fresh and last is not None and now - last[0] < _AVAILABLE_TTL:
        return last[1]
    if device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0])
    else:
        free = _read_cpu_available()
    _AVAILABLE[device] = (now, free)
    return free


def _read_cpu_available() -> int:
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


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit (bytes, KiB, MiB, GiB, TiB) that keeps it >= 1.

    Args:
        n: A number of bytes (non-negative).

    Returns:
        E.g. ``'512 bytes'``, ``'1.50 KiB'``, ``'3.00 GiB'``.
    """
    if n < 1024:
        return f"{int(n)} byte{'' if int(n) == 1 else 's'}"
    exponent = min(4, (int(n).bit_length() - 1) // 10)
    return f"{n / 1024**exponent:.2f} {('KiB', 'MiB', 'GiB', 'TiB')[exponent - 1]}"


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
    need = numel * dtype.itemsize
    limit = max_bytes if max_bytes is not None else available_bytes(device)
    if need > limit and max_bytes is None:  # a reused reading may be stale: read again
        limit = available_bytes(device, fresh=True)
    if need > limit:
        raise MemoryBudgetError(
            f"{what} of shape {tuple(shape)} ({dtype}) needs {format_bytes(need)}, more than "
            f"the {format_bytes(limit)} {'allowed by max_bytes' if max_bytes else 'free'} on "
            f"{device}; use a lazy operator (full_operator / diag / kron) or a subnetwork"
        )
