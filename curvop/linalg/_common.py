"""Shared pieces of the linear-algebra routines: counted products, probes, shifts, estimates.

The :class:`Estimate` record carries a stochastic result with its standard error.

Shapes: `P` the operator side, `m` right-hand sides or probes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from curvop.errors import InputError, InputTypeError

__all__ = ["Estimate", "CountedOperator", "as_counted", "rademacher", "as_deltas",
           "check_rhs", "check_positive_int"]


@dataclass(frozen=True)
class Estimate:
    r"""A stochastic estimate with its standard error.

    Attributes:
        value: The estimate (a scalar tensor, or the shape of the estimated quantity).
        stderr: Its standard error, the sample standard deviation over probes divided by
            :math:`\sqrt{m}` (same shape as ``value``; zero for exact results).
        num_probes: Number of probe vectors `m` (0 for exact results).
        num_products: Operator products (one per probe column and Lanczos step).
    """

    value: Tensor
    stderr: Tensor
    num_probes: int = 0
    num_products: int = 0

    def __iter__(self):
        """Unpack as ``value, stderr = estimate``."""
        return iter((self.value, self.stderr))


class CountedOperator:
    """``X ↦ (A + δI) X`` for `(P, m)` blocks, counting products (one per column).

    Args:
        op: A square ``LinearOperator``, a `(P, P)` tensor or a callable on `(P, m)` blocks.
        delta: Shift ``δ`` added to the diagonal.
        size: `P`, needed only for a callable.
        dtype: The dtype of the products (the operator's unless given).
        device: The device of the products (the operator's unless given).

    Attributes:
        num_products: Columns multiplied so far.
        num_calls: Calls so far (one per block of columns).
    """

    def __init__(self, op, delta: float = 0.0, size: int | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        if isinstance(op, (Tensor, LinearOperator)):
            if op.dim() != 2 or op.shape[0] != op.shape[1]:
                raise InputError(f"`op` must be a square (P, P) operator; got shape "
                                 f"{tuple(op.shape)}")
            self.size = op.shape[0]
            self.dtype = dtype or op.dtype
            self.device = device or op.device
            self._apply = op.matmul
        elif callable(op):
            if size is None:
                raise InputError("a callable `op` needs `size` (P)")
            self.size = int(size)
            self.dtype = dtype or torch.get_default_dtype()
            self.device = device or torch.device("cpu")
            self._apply = op
        else:
            raise InputTypeError("`op` must be a LinearOperator, a tensor or a callable; got "
                                 f"{type(op).__name__}")
        self.op = op
        self.delta = float(delta)
        self.num_products = 0
        self.num_calls = 0

    def __call__(self, X: Tensor) -> Tensor:
        """``(A + δI) X`` for ``X`` `(P, m)`, in the operator's dtype, returned in ``X``'s."""
        self.num_products += X.shape[-1]
        self.num_calls += 1
        with torch.no_grad():
            out = self._apply(X.to(self.dtype)).to(X.dtype)
        if self.delta:
            out = out + self.delta * X
        return out


def as_counted(op, delta: float = 0.0, size: int | None = None) -> CountedOperator:
    """``op`` as a :class:`CountedOperator` (returned unchanged if it already is one)."""
    if isinstance(op, CountedOperator):
        if delta:
            raise InputError("pass `delta` to the CountedOperator itself")
        return op
    return CountedOperator(op, delta, size)


def rademacher(n: int, m: int, generator: torch.Generator | None = None, seed: int | None = None,
               dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
    """`(n, m)` Rademacher (±1) probes, drawn on the CPU (device-independent), then moved.

    Column ``j`` is the ``j``-th probe the generator yields, whatever ``m``.

    Args:
        n: Rows.
        m: Columns (probes).
        generator: A CPU ``torch.Generator`` (takes precedence over ``seed``).
        seed: Seed of a fresh generator when ``generator`` is None (default 0).
        dtype: Dtype of the result.
        device: Device of the result.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    # drawn probe by probe (rows of `(m, n)`), so splitting probes into blocks changes nothing
    Z = torch.randint(0, 2, (m, n), generator=generator, dtype=torch.int8)
    return (Z.T.to(dtype) * 2 - 1).contiguous().to(device)


def as_deltas(delta: object, name: str = "delta") -> tuple[Tensor, bool]:
    """``delta`` as a 1-D float64 CPU tensor and whether it was a scalar.

    Raises:
        InputTypeError: If ``delta`` is not a real number, sequence or tensor.
        InputError: If an entry is not finite.
    """
    if isinstance(delta, bool):
        raise InputTypeError(f"`{name}` must be a real number or tensor; got bool")
    if isinstance(delta, numbers.Real):
        t, scalar = torch.tensor([float(delta)], dtype=torch.float64), True
    elif isinstance(delta, Tensor):
        if not (delta.dtype.is_floating_point or delta.dtype in (torch.int32, torch.int64)):
            raise InputTypeError(f"`{name}` must be a real tensor; got {delta.dtype}")
        scalar = delta.dim() == 0
        t = delta.detach().to("cpu", torch.float64).reshape(-1)
    elif isinstance(delta, (list, tuple)):
        try:
            t = torch.tensor([float(d) for d in delta], dtype=torch.float64)
        except (TypeError, ValueError) as err:
            raise InputTypeError(f"`{name}` must hold real numbers; got {delta!r}") from err
        scalar = False
    else:
        raise InputTypeError(f"`{name}` must be a real number, a sequence or a tensor; got "
                             f"{type(delta).__name__}")
    if t.numel() == 0:
        raise InputError(f"`{name}` must hold at least one value")
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"`{name}` must be finite; got {t.tolist()}")
    return t, scalar


def check_rhs(rhs: object, P: int, dtype: torch.dtype, device: torch.device,
              name: str = "rhs") -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """``rhs`` `(P,)` or `(P, m)` as `(P, m)` and the map back to its shape.

    Raises:
        InputTypeError: If ``rhs`` is not a floating tensor.
        InputError: If it has another length than `P` or more than two dimensions.
    """
    if not isinstance(rhs, Tensor) or not rhs.dtype.is_floating_point:
        raise InputTypeError(f"`{name}` must be a floating-point tensor; got "
                             f"{getattr(rhs, 'dtype', type(rhs).__name__)}")
    if rhs.dim() not in (1, 2) or rhs.shape[0] != P:
        raise InputError(f"`{name}` must have shape ({P},) or ({P}, m); got {tuple(rhs.shape)}")
    if rhs.device != torch.device(device) and not (
            rhs.device.type == torch.device(device).type == "cuda"):
        raise InputError(f"`{name}` must be on {device}; got {rhs.device}")
    if rhs.dim() == 1:
        return rhs.unsqueeze(-1), lambda x: x.squeeze(-1)
    return rhs, lambda x: x


def check_positive_int(value: object, name: str, low: int = 1) -> int:
    """``value`` as an int ``≥ low``.

    Raises:
        InputTypeError: If it is not an integer.
        InputError: If it is below ``low``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"`{name}` must be an integer; got {type(value).__name__}")
    if value < low:
        raise InputError(f"`{name}` must be an integer ≥ {low}; got {value}")
    return int(value)


def sample_stderr(samples: Tensor) -> Tensor:
    """Standard error of the mean over the first dimension (0 for a single sample)."""
    m = samples.shape[0]
    if m < 2:
        return torch.zeros_like(samples[0])
    return samples.std(0) / math.sqrt(m)
