"""CUDA graphs for the repeated products of one operator.

On a GPU a product of a small or medium network is bound by the host, not by the device: the
product of the 270k-parameter MLP at batch 128 launches about 25 kernels through two backward
passes of the cached graph, each kernel a few microseconds of device time behind tens of
microseconds of Python, dispatcher and launch on the host. Solvers and eigensolvers repeat the
same product with new vectors, so from the second product of a given shape on, the product is
recorded once into a ``torch.cuda.CUDAGraph`` (columns copied into a static input, the result
out of a static output) and replayed: three launches per product, whatever the network.

On an H100 (``benchmarks/results/cuda_h100_runs.md``, run 5, torch 2.11) a GGN product of the
MLP went from 1.38 ms to 0.15 ms (0.17x one forward+backward), of the CNN from 3.3 ms to
0.55 ms; a 16-column matmat of the CNN, bound by its kernels, from 13.1 to 7.1 ms; the replays
agreed with the eager products to rounding (bit for bit on the MLP,
``benchmarks/gpu/probe_graphs.py``).

Written here because ``torch.cuda.make_graphed_callables`` graphs a function *and its backward*
for autograd; a product is a fixed function of its columns without autograd, for which a plain
capture is enough. A product is replayed only where that is safe: a CUDA tensor that needs no
gradient (or grad mode off), no ``torch.func`` transform around it, no capture already running,
no autocast. A shape whose capture fails runs eagerly (after :data:`MAX_FAILURES` tries: the
first capture in a process can trip over lazily initialised libraries). Each captured shape
keeps its own memory pool (one product's intermediates) while the operator lives; at most
:data:`MAX_SHAPES` shapes are captured per operator. :func:`use_cuda_graphs` switches it off
(and on) for the whole process.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

__all__ = ["use_cuda_graphs", "cuda_graphs_enabled", "matmat", "linearized", "MAX_SHAPES"]

#: shapes `(k, P)` captured per operator at most (each holds a memory pool)
MAX_SHAPES = 4
#: failed captures after which a shape stays eager
MAX_FAILURES = 3
#: eager products run on the capture's own stream before it is recorded
WARMUPS = 2

_enabled = True
#: held by every graphed product: a capture records whatever runs on its stream, from any thread,
#: so no other product may run on the operators' stream while one is recorded
_LOCK = threading.RLock()


def use_cuda_graphs(enabled: bool = True) -> None:
    """Switch the replay of repeated products as CUDA graphs on or off (on by default).

    Args:
        enabled: Whether products of operators on a GPU may be recorded and replayed.

    Raises:
        TypeError: If ``enabled`` is not a bool.

    Example:
        >>> import curvop
        >>> curvop.use_cuda_graphs(False)  # every product runs eagerly from here on
        >>> curvop.cuda_graphs_enabled()
        False
        >>> curvop.use_cuda_graphs(True)
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be a bool; got {type(enabled).__name__}")
    _enabled = enabled


def cuda_graphs_enabled() -> bool:
    """Whether products on a GPU may be replayed as CUDA graphs.

    Returns:
        The setting of :func:`use_cuda_graphs` (``True`` unless switched off).
    """
    return _enabled


def _autocast(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except TypeError:  # pragma: no cover - torch < 2.4
        return torch.is_autocast_enabled()


def _functorch_wrapped(V: Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(V)) if check is not None else False


def _eligible(V: Tensor) -> bool:
    return (_enabled and V.is_cuda and not (V.requires_grad and torch.is_grad_enabled())
            and not _functorch_wrapped(V) and not torch.cuda.is_current_stream_capturing()
            and not _autocast(V.device))


class _Replay:
    """A captured product: copy the columns in, replay, copy the result out."""

    def __init__(self, graph: torch.cuda.CUDAGraph, static_in: Tensor, static_out: Tensor):
        self.graph, self.static_in, self.static_out = graph, static_in, static_out

    def __call__(self, V: Tensor) -> Tensor:
        self.static_in.copy_(V)
        self.graph.replay()
        return self.static_out.clone()


class _Slot:
    """What is known about one shape: eager products so far, failed captures, the replay.

    ``error`` keeps the last failed capture's exception, for diagnosis.
    """

    __slots__ = ("calls", "failures", "replay", "error")

    def __init__(self) -> None:
        self.calls, self.failures, self.replay, self.error = 0, 0, None, None


#: one CUDA stream per device for every operator's linearisation, warm-ups and captures
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _stream(device: torch.device) -> torch.cuda.Stream:
    """The stream of ``device`` that linearisations are recorded and captured on.

    One per device, shared by all operators: cuBLAS keeps a workspace per stream that it has
    run on (32 MiB on an H100), so a stream per operator or per capture would cost that much
    memory each (the first H100 run of CUDA graphs measured 65 MB more per product entry).
    """
    stream = _STREAMS.get(device)
    if stream is None:
        stream = _STREAMS[device] = torch.cuda.Stream(device)
    return stream


def linearized(make, device: torch.device):
    """``make()`` (an operator's products: its cached graph), on a stream of its own on CUDA.

    The backward passes of a product run on the stream their forward ran on. Recorded on the
    legacy default stream, they could never be captured ("operation would make the legacy
    stream depend on a capturing blocking stream"); recorded on a stream of their own, the
    autograd engine orders them after the caller's stream and the caller's after them, eagerly
    and inside a capture alike.
    """
    if device.type != "cuda":
        return make()
    stream = _stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        products = make()
    torch.cuda.current_stream(device).wait_stream(stream)
    return products


def _end_failed_capture(device: torch.device) -> None:
    """Leave CUDA's random generator usable after a capture that failed.

    A capture that fails midway never runs the generator's end-of-capture step, and every later
    random draw on the device would raise ("Offset increment outside graph capture"); a trivial
    capture that succeeds runs it.
    """
    try:
        stream = _stream(device)
        x = torch.zeros(1, device=device)
        with torch.cuda.device(device), torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream):
            x.add_(1)
    except Exception:  # noqa: BLE001 - nothing more to be done here
        pass


def _capture(fn, V: Tensor) -> _Replay:
    """Record ``fn`` at a static copy of ``V``.

    The warm-up runs on the very stream that is then captured, the one the linearisation was
    recorded on (per-stream library state such as cuBLAS workspaces then exists before the
    capture, and the backward passes need no second stream). ``thread_local`` capture errors: the
    backward passes run on the autograd engine's device thread, not the capturing one, and
    another thread's unrelated work (a data loader pinning memory) must not spoil a capture.
    """
    device = V.device
    static_in = V.detach().clone()
    side = _stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUPS):
            fn(static_in)
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), torch.cuda.graph(graph, stream=side,
                                                     capture_error_mode="thread_local"):
        static_out = fn(static_in)
    torch.cuda.current_stream(device).wait_stream(side)
    return _Replay(graph, static_in, static_out)


def matmat(products, V: Tensor) -> Tensor:
    """``products.matmat(V)``, replayed as a CUDA graph from the second call of a shape on.

    Args:
        products: An operator's products object (``matmat(V (k, P)) -> (k, P)``); the captured
            graphs are kept on it, so copies of an operator sharing it share them.
        V: Columns as rows `(k, P)`.

    Returns:
        The product `(k, P)`, a tensor of its own (not a static buffer).
    """
    if not _eligible(V):
        return products.matmat(V)
    with _LOCK:
        return _graphed(products, V)


def _graphed(products, V: Tensor) -> Tensor:
    slots = products.__dict__.setdefault("_cuda_graphs", {})
    key = tuple(V.shape)
    slot = slots.get(key)
    if slot is None:
        if len(slots) >= MAX_SHAPES:
            return products.matmat(V)
        slot = slots[key] = _Slot()
    if slot.replay is not None:
        return slot.replay(V)
    slot.calls += 1
    if slot.calls < 2 or slot.failures >= MAX_FAILURES:
        # the first product of a shape runs eagerly: it settles the products' own choices
        # (reverse or forward mode, batched or looped columns) before anything is recorded
        return products.matmat(V)
    try:
        slot.replay = _capture(products.matmat, V)
    except Exception as e:  # noqa: BLE001 - whatever a capture cannot hold runs eagerly
        slot.failures += 1
        slot.error = e
        _end_failed_capture(V.device)
        return products.matmat(V)
    return slot.replay(V)
