"""Timing and peak memory of one (problem, entry), isolated in a fresh child process.

What is measured:

* **Time**: one warm-up call, then up to ``repeats`` calls (fewer when the warm-up call
  shows that they would exceed ``budget_s``), each bracketed by
  ``torch.cuda.synchronize()`` on CUDA and timed with :func:`time.perf_counter`. The
  reported time is the median of the timed calls, in milliseconds.
* **Peak memory**, relative to the process right after the problem (model and data) is
  built, over the entry's untimed setup and its warm-up call:

  - CUDA: ``torch.cuda.max_memory_allocated()`` minus ``torch.cuda.memory_allocated()``
    before (tensors allocated by torch only; the caching allocator's reserve is excluded).
  - CPU: peak resident set size (``VmHWM`` of ``/proc/self/status``) minus ``VmRSS``
    before, after resetting the high-water mark with ``/proc/self/clear_refs``. This counts
    every page the process touched (tensors, allocator slack, lazily loaded code), so it is
    an upper bound on the tensor memory. Where ``clear_refs`` is unavailable the
    ``getrusage`` maximum is used and the value is marked as not reset.

Each (problem, entry) runs in its own child process forked from a fork server that has only
imported the libraries (no tensors, no thread pools): memory starts clean, a crash or an
out-of-memory kill stays in the child, and a time-out kills the child.
"""

from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
import resource
import statistics
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["RESULT_DEFAULTS", "fork_context", "measure_entry", "measure_interleaved", "other_load",
           "run_isolated", "time_thunk"]

RESULT_DEFAULTS: dict[str, Any] = {
    "status": "error", "median_ms": None, "min_ms": None, "times_ms": [], "warmup_ms": None,
    "peak_mem_mb": None, "peak_mem_reset": None, "error": None, "other_cpu_load": None,
}
"""Every result dict has these keys (timeouts and crashes fill in the defaults)."""

_MiB = 2**20


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak(device: torch.device) -> bool:
    """Reset the peak-memory counter; return whether that was possible."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _memory_now(device: torch.device) -> int:
    """Current memory in bytes: allocated CUDA tensors, or the resident set size."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    rss = _status_kib("VmRSS")
    return 1024 * rss if rss is not None else 0


def _memory_peak(device: torch.device) -> int:
    """Peak memory in bytes since the last :func:`_reset_peak`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return 1024 * hwm
    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_seconds() -> tuple[float, float]:
    """`(busy CPU seconds of the whole host, CPU seconds of this process)` so far."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/stat") as fh:
            f = [int(v) for v in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return math.nan, me.ru_utime + me.ru_stime
    busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7]  # user nice system irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK"), me.ru_utime + me.ru_stime


def other_load(window_s: float = 0.5) -> float:
    """Cores kept busy by other processes over the next ``window_s`` seconds.

    Args:
        window_s: Sampling window.

    Returns:
        Busy CPU seconds of the host minus those of this process, per second.
    """
    (h0, s0), t0 = _cpu_seconds(), time.perf_counter()
    time.sleep(window_s)
    (h1, s1), t1 = _cpu_seconds(), time.perf_counter()
    return max(0.0, (h1 - h0) - (s1 - s0)) / (t1 - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_thunk(
    thunk: Callable[[], Any], device: torch.device, repeats: int, budget_s: float,
    keep: list | None = None,
) -> tuple[float, list[float]]:
    """Time a thunk: one warm-up call, then up to ``repeats`` timed calls.

    Args:
        thunk: The zero-argument call to time; its result is discarded.
        device: Device to synchronise before and after each call.
        repeats: Largest number of timed calls (0: the warm-up call only).
        budget_s: Time budget of the timed calls; a slow thunk gets fewer repeats (>= 1).
        keep: If given, the last call's result is appended to it (the others are dropped).

    Returns:
        `(warm-up seconds, [timed seconds, ...])`.
    """
    _sync(device)
    t0 = time.perf_counter()
    out = thunk()
    _sync(device)
    warm = time.perf_counter() - t0
    del out
    n = min(repeats, max(1, math.floor(budget_s / max(warm, 1e-9))))
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        out = thunk()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if keep is not None and len(times) == n:
            keep.append(out)
        del out
    return warm, times


def _prewarm(problem: Any) -> None:
    """Run one forward + backward pass before memory is measured.

    Afterwards the thread pool, the allocator's arenas and the code pages of the common
    kernels are resident, so they do not count towards the entry.
    """
    problem.lossfunc()(problem.model(problem.x), problem.y).backward()
    problem.model.zero_grad(set_to_none=True)
    _sync(problem.device)


def _error_string(err: BaseException) -> str:
    msg = " ".join(str(err).split())
    return f"{type(err).__name__}: {msg}"[:400]


def _start(problem: str, entry: str, device: str, quick: bool, threads: int | None,
           dense_gb: float) -> tuple[Any, torch.device, Any, dict[str, Any]]:
    """The entry's spec, the device, a freshly built (and pre-warmed) problem, a result dict."""
    from benchmarks.competitors import ENTRIES, LIMITS
    from benchmarks.problems import make_problem

    warnings.simplefilter("ignore")
    if threads is not None:
        torch.set_num_threads(threads)
    LIMITS["dense_bytes"] = dense_gb * 2**30
    spec = ENTRIES[entry]
    dev = torch.device(device)
    prob = make_problem(problem, quick=quick, device=dev)
    _prewarm(prob)
    result: dict[str, Any] = {
        "entry": entry,
        "library": spec.library,
        "task": spec.task,
        "note": spec.note,
        "status": "ok",
        "median_ms": None,
        "times_ms": [],
        "warmup_ms": None,
        "peak_mem_mb": None,
        "peak_mem_reset": None,
        "error": None,
        "other_cpu_load": None,
    }
    return spec, dev, prob, result


Thunk = Callable[[], Any]


def _set_up(spec: Any, prob: Any, dev: torch.device, result: dict[str, Any],
            first_calls: Callable[[Thunk], Any]) -> tuple[Thunk, Any] | None:
    """Set an entry up and make its first calls (``first_calls(thunk)``), in a fresh memory peak.

    Returns:
        ``(thunk, first_calls(thunk))`` with ``peak_mem_mb`` (and ``peak_mem_reset``) set in
        ``result``; ``None`` after recording a failure (``'skipped'`` or ``'error'``) there.
    """
    before = _memory_now(dev)
    result["peak_mem_reset"] = _reset_peak(dev)
    torch.manual_seed(0)
    try:
        thunk = spec.setup(prob)
        if hasattr(thunk, "counts"):
            thunk.counts.clear()
        first = first_calls(thunk)
    except Exception as err:  # noqa: BLE001 - every failure is a result to report
        from benchmarks.competitors import Skipped

        result["status"] = "skipped" if isinstance(err, Skipped) else "error"
        result["error"] = str(err) if isinstance(err, Skipped) else _error_string(err)
        if os.environ.get("CURVOP_BENCH_TRACEBACK"):
            traceback.print_exc()
        return None
    result["peak_mem_mb"] = max(0, _memory_peak(dev) - before) / _MiB
    return thunk, first


def _record_times(result: dict[str, Any], seconds: list[float]) -> None:
    """The timed calls of an entry: all of them, the median and the minimum, in ms."""
    result["times_ms"] = [1e3 * t for t in seconds]
    result["median_ms"] = 1e3 * statistics.median(seconds)
    result["min_ms"] = 1e3 * min(seconds)


def measure_entry(
    problem: str,
    entry: str,
    device: str = "cpu",
    quick: bool = False,
    repeats: int = 5,
    budget_s: float = 3.0,
    threads: int | None = None,
    dense_gb: float = 2.0,
    check: bool = False,
) -> dict[str, Any]:
    """Build a problem, set up an entry, and time it and measure its peak memory.

    Exceptions of the entry are caught and reported; this function only raises for
    unknown problem or entry names.

    Args:
        problem: A key of :data:`benchmarks.problems.PROBLEMS`.
        entry: A key of :data:`benchmarks.competitors.ENTRIES`.
        device: ``'cpu'`` or ``'cuda'``.
        quick: Use the tiny problem variant.
        repeats: Largest number of timed calls after the warm-up call.
        budget_s: Time budget of the timed calls.
        threads: ``torch.set_num_threads`` value; ``None`` leaves torch's default.
        dense_gb: Largest dense result (GiB) before the entry is skipped.
        check: Also compare the result with the task's curvop reference (see
            :mod:`benchmarks.check`); adds ``check_rel_err`` or ``check_error``.

    Returns:
        A dict with ``status`` (``'ok'``, ``'error'`` or ``'skipped'``), ``median_ms``,
        ``times_ms``, ``warmup_ms``, ``peak_mem_mb``, ``peak_mem_reset``, ``error`` and
        ``other_cpu_load`` (cores used by other processes while it ran; 10 ms ticks).
    """
    spec, dev, prob, result = _start(problem, entry, device, quick, threads, dense_gb)
    (host0, self0), wall0 = _cpu_seconds(), time.perf_counter()
    last: list = []
    done = _set_up(spec, prob, dev, result,
                   lambda thunk: time_thunk(thunk, dev, repeats, budget_s, keep=last))
    if done is None:
        return result
    (host1, self1), wall1 = _cpu_seconds(), time.perf_counter()
    thunk, (warm, times) = done
    busy_other = max(0.0, (host1 - host0) - (self1 - self0))
    result["other_cpu_load"] = round(busy_other / (wall1 - wall0), 2)
    result["warmup_ms"] = 1e3 * warm
    _record_times(result, times)
    result.update(_coverage(spec, thunk, prob))
    result.update(_eigen(problem, spec, thunk, last[0], 1 + len(times), quick, dev))
    last.clear()
    if check:
        result.update(_check(problem, spec, thunk, prob, quick, dev))
    return result


def measure_interleaved(
    problem: str,
    entries: list[str],
    device: str = "cpu",
    quick: bool = False,
    repeats: int = 5,
    budget_s: float = 3.0,
    threads: int | None = None,
    dense_gb: float = 2.0,
    inner: int = 2,
) -> list[dict[str, Any]]:
    """Measure several entries of one problem in this process, timing them in turns.

    Each entry gets its own freshly built problem (a library that changes the model, such as
    BackPACK's ``extend``, cannot touch another entry's), its setup and one warm-up call, with
    its peak memory over those as in :func:`measure_entry` (in this process, after the entries
    before it, so that only differences count). Then up to ``repeats`` rounds call every entry
    in turn, in an order rotated each round: one untimed call, then ``inner`` timed ones; each
    entry's median is taken over all its timed calls.
    A host whose speed drifts (other tenants, clock changes) then slows every entry of a round
    alike, so ratios between entries hold where back-to-back blocks of repeats would not.

    Args:
        problem, device, quick, threads, dense_gb: As for :func:`measure_entry`.
        entries: Entry names; the baseline among them gives the ratios later.
        repeats: Largest number of timed calls per entry (``inner`` per round).
        budget_s: Time budget per entry; the rounds stop when the whole budget is spent
            (at least 3 rounds). Python's garbage collector runs between the rounds only.
        inner: Timed calls per entry and round.

    Returns:
        One result dict per entry, in the order given, as :func:`measure_entry` returns.
    """
    from benchmarks.check import EIG_TASKS

    live: list[tuple[dict[str, Any], Any, Any, Callable[[], Any]]] = []
    results = []
    for entry in entries:
        spec, dev, prob, result = _start(problem, entry, device, quick, threads, dense_gb)
        results.append(result)
        done = _set_up(spec, prob, dev, result,
                       lambda thunk, dev=dev: time_thunk(thunk, dev, 0, 0.0))
        if done is None:
            continue
        thunk, (warm, _) = done
        result["warmup_ms"] = 1e3 * warm
        live.append((result, spec, prob, thunk))
    if not live:
        return results
    dev = torch.device(device)
    # rounds until ``repeats`` timed calls per entry, or the budget is spent after at least 3
    # (the warm-up calls carry one-off costs, so the rounds themselves are timed)
    max_rounds, budget = max(3, -(-repeats // inner)), budget_s * len(live)
    times: dict[int, list[float]] = {id(r): [] for r, *_ in live}
    last: dict[int, Any] = {}
    (host0, self0), wall0 = _cpu_seconds(), time.perf_counter()
    k, rounds = 0, max_rounds
    while k < rounds:
        if k >= 3 and time.perf_counter() - wall0 > budget:
            rounds = k + 1  # this round is the last one
        gc.collect()  # a collection inside a timed call would land on one entry only
        order = live[k % len(live):] + live[:k % len(live)]
        for result, spec, _, thunk in order:
            # one untimed call first: the entry before left the caches (CPU caches, the
            # interpreter's, the allocator's free blocks) to its own data and code
            del_out = thunk()
            del del_out
            gc.disable()
            try:
                for _ in range(inner):
                    _sync(dev)
                    t0 = time.perf_counter()
                    out = thunk()
                    _sync(dev)
                    times[id(result)].append(time.perf_counter() - t0)
                    if spec.task in EIG_TASKS and k == rounds - 1:
                        last[id(result)] = out
                    del out
            finally:
                gc.enable()
        k += 1
    (host1, self1), wall1 = _cpu_seconds(), time.perf_counter()
    load = round(max(0.0, (host1 - host0) - (self1 - self0)) / (wall1 - wall0), 2)
    for result, spec, prob, thunk in live:
        ts = times[id(result)]
        result["other_cpu_load"] = load
        _record_times(result, ts)
        result["interleaved"] = True
        result.update(_coverage(spec, thunk, prob))
        if id(result) in last:
            result.update(_eigen(problem, spec, thunk, last.pop(id(result)), 1 + len(ts),
                                 quick, dev))
    return results


def _coverage(spec: Any, thunk: Callable[[], Any], prob: Any) -> dict[str, Any]:
    """Mark a Kronecker-factored result that silently leaves out parameters as invalid."""
    from benchmarks.check import COVERAGE_TASKS, covered_params

    if spec.task not in COVERAGE_TASKS:
        return {}
    covered = covered_params(thunk())
    if covered is None or covered == prob.num_params:
        return {}
    return {"status": "invalid", "error": f"result covers {covered} of {prob.num_params} "
            "parameters (unsupported layers silently left out)"}


def _eigen(problem: str, spec: Any, thunk: Callable[[], Any], out: Any, calls: int,
           quick: bool, dev: torch.device) -> dict[str, Any]:
    """Operator work and accuracy of an eig entry.

    The work is per call: the counts over ``calls`` identical, seeded calls divided by
    ``calls``; the accuracy is that of ``out``, the last timed call's result.
    """
    from benchmarks.check import EIG_TASKS, eig_accuracy
    from benchmarks.competitors import EIG_K

    if spec.task not in EIG_TASKS:
        return {}
    counts = getattr(thunk, "counts", None)
    extra: dict[str, Any] = {}
    if counts is not None:
        extra["eig_counts"] = {k: round(v / calls, 1) for k, v in counts.items()}
    try:
        extra.update(eig_accuracy(out, problem, quick, spec.task, EIG_K, dev))
    except Exception as err:  # noqa: BLE001 - a failed check is a result to report
        extra["eig_error"] = _error_string(err)
    return extra


def _check(problem: str, spec: Any, thunk: Callable[[], Any], prob: Any, quick: bool,
           dev: torch.device) -> dict[str, Any]:
    """Relative error of the entry's result against the task's curvop reference."""
    from benchmarks.check import CHECKED_TASKS, relative_error, to_common_form
    from benchmarks.competitors import ENTRIES, REFERENCE
    from benchmarks.problems import make_problem

    if spec.task not in CHECKED_TASKS:
        return {}
    try:
        value = to_common_form(thunk(), prob)
    except Exception as err:  # noqa: BLE001 - a failed check is a result to report
        return {"check_error": _error_string(err)}
    failures = []
    for ref_name in REFERENCE.get(spec.task, []):
        if ref_name == spec.name:  # this entry is the reference
            return {}
        try:
            ref_prob = make_problem(problem, quick=quick, device=dev)
            torch.manual_seed(0)
            reference = to_common_form(ENTRIES[ref_name].setup(ref_prob)(), ref_prob)
        except Exception as err:  # noqa: BLE001
            failures.append(f"reference {ref_name} failed: {_error_string(err)[:80]}")
            continue
        return {"check_rel_err": relative_error(value, reference), "check_reference": ref_name}
    return {"check_error": "; ".join(failures) or "no curvop reference"}


def _child(conn: Any, kwargs: dict[str, Any]) -> None:
    """Child-process body: measure and send the result dict through ``conn``."""
    try:
        conn.send(measure_entry(**kwargs))
    except BaseException as err:  # noqa: BLE001 - report, never hang the parent
        conn.send({"status": "error", "error": _error_string(err)})
    finally:
        conn.close()


def fork_context(preload: Iterable[str]) -> mp.context.BaseContext:
    """A multiprocessing context whose children fork from a server that imported ``preload``.

    The fork server imports the libraries once (torch alone takes seconds), so every child
    starts in milliseconds yet holds no tensors, CUDA context or thread pool of an earlier
    measurement. Modules that fail to import are skipped by the server.

    Args:
        preload: Module names for the fork server to import.

    Returns:
        The ``'forkserver'`` context (``'spawn'`` where fork servers are unavailable).
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["benchmarks.measure", *preload])
    return ctx


def run_isolated(
    kwargs: dict[str, Any], timeout_s: float, ctx: mp.context.BaseContext | None = None
) -> dict[str, Any]:
    """Run :func:`measure_entry` in a child process with a time-out.

    Args:
        kwargs: Keyword arguments of :func:`measure_entry`.
        timeout_s: Seconds after which the child is killed.
        ctx: Multiprocessing context, e.g. from :func:`fork_context`.

    Returns:
        The result dict of :func:`measure_entry`, or one with ``status='timeout'`` or
        ``status='error'`` (child crashed, e.g. killed for memory) and the reason.
    """
    ctx = ctx or fork_context([])
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, kwargs), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    result: dict[str, Any]
    try:
        if recv.poll(timeout_s):
            result = recv.recv()
        else:
            result = {"status": "timeout", "error": f"timed out after {timeout_s:.0f} s"}
    except EOFError:
        proc.join(5)
        reason = f"child died (exit code {proc.exitcode}; killed for memory?)"
        result = {"status": "error", "error": reason}
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv.close()
    for key, default in RESULT_DEFAULTS.items():
        result.setdefault(key, default)
    result.setdefault("entry", kwargs["entry"])
    result["wall_s"] = time.perf_counter() - t0
    return result
