"""Run the benchmark suite: ``python -m benchmarks.run [--quick] [--problems mlp cnn ...]``.

Every (problem, entry) is measured in a fresh child process (see :mod:`benchmarks.measure`).
Results go to ``<out>/<problem>_<device>.json`` (``..._quick.json`` in quick mode), and
``<out>/README.md`` is rebuilt from every JSON file in ``<out>`` (see
:mod:`benchmarks.report`).

Examples:
    Full CPU run (about 15 minutes of measurements with one thread on a quiet 2-core
    machine; longer when other processes share the cores)::

        python -m benchmarks.run --threads 1

    Smoke run of two tasks on one tiny problem::

        python -m benchmarks.run --quick --problems mlp --tasks baseline ggn_product
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.competitors import ENTRIES, LIBRARY_MODULES, REFERENCE, TASKS
from benchmarks.measure import (
    RESULT_DEFAULTS,
    fork_context,
    measure_entry,
    measure_interleaved,
    other_load,
    run_isolated,
)
from benchmarks.problems import DEFAULT_PROBLEMS, PROBLEMS, make_problem
from benchmarks.report import machine_info, write_readme

__all__ = ["add_ratios", "main", "parse_args", "select_entries"]

BASELINE = "torch.fwd_bwd"

TIMEOUT_SCALE: dict[str, float] = {"eig_top10": 4.0, "eig_top10_hessian": 4.0,
                                   "laplace_full": 2.0, "laplace_diag": 2.0,
                                   "laplace_kron": 2.0}
"""Task -> multiple of ``--timeout`` its entries get (one call is tens to hundreds of
forward+backward passes, plus the untimed accuracy check of the eig tasks)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The parsed namespace.
    """
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=DEFAULT_PROBLEMS, choices=list(PROBLEMS))
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), help="only these tasks")
    ap.add_argument("--entries", nargs="+", metavar="GLOB",
                    help="only entries matching one of these globs, e.g. 'curvop.*'")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="tiny problems, few repeats")
    ap.add_argument("--repeats", type=int, help="timed calls after warm-up (5; quick 2)")
    ap.add_argument("--budget", type=float,
                    help="seconds of timed calls per entry; slow entries repeat less "
                         "(3; quick 0.5)")
    ap.add_argument("--timeout", type=float, help="seconds per entry before kill (120; quick 30)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads in every child (default: torch's default here)")
    ap.add_argument("--dense-gb", type=float, default=2.0,
                    help="skip entries whose dense result would exceed this many GiB")
    ap.add_argument("--busy", type=float, metavar="CORES",
                    help="rerun an entry once (after waiting for the host to calm down) if other "
                         "processes kept more than CORES cores busy while it ran (default: the "
                         "cores this run leaves free + 0.25, at least 0.5)")
    ap.add_argument("--idle-wait", type=float, default=5.0, metavar="SECONDS",
                    help="longest wait for other processes to go quiet before a rerun")
    ap.add_argument("--redo-busy", action="store_true",
                    help="rerun only the entries of the existing result files that were measured "
                         "on a busy host (see --busy), and merge")
    ap.add_argument("--isolation", default="process", choices=["process", "none", "interleave"],
                    help="'none' runs entries in this process (debugging; memory not isolated); "
                         "'interleave' too, and times the entries of a problem in turns, one "
                         "call each per round (ratios robust to a host whose speed drifts; "
                         "used on GPUs)")
    ap.add_argument("--preload", default="all", choices=["all", "needed"],
                    help="libraries the fork server imports: all (default; same baseline for "
                         "every entry) or only those of the selected entries (faster start)")
    ap.add_argument("--check", action="store_true",
                    help="compare every result with the task's curvop reference (use --quick)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--list", action="store_true", help="list tasks and entries, then exit")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.budget = args.budget if args.budget is not None else (0.5 if args.quick else 3.0)
    args.timeout = args.timeout or (30.0 if args.quick else 120.0)
    if args.busy is None:
        args.busy = max(0.5, (os.cpu_count() or 1) - args.threads + 0.25)
    if args.check and args.isolation == "interleave":
        ap.error("--check compares results one entry at a time: use it without "
                 "--isolation interleave")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda requested but torch.cuda.is_available() is False")
    return args


def select_entries(tasks: list[str] | None, globs: list[str] | None) -> list[str]:
    """Entry names filtered by task and by name globs; the baseline is always included.

    Args:
        tasks: Keep only entries of these tasks (``None``: all).
        globs: Keep only entries matching one of these ``fnmatch`` patterns (``None``: all).

    Returns:
        Entry names in registry order.
    """
    names = [
        name for name, e in ENTRIES.items()
        if (tasks is None or e.task in tasks)
        and (globs is None or any(fnmatch.fnmatchcase(name, g) for g in globs))
    ]
    return [BASELINE] + [n for n in names if n != BASELINE]


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Add ``ratio_fwd_bwd`` and ``ratio_curvop`` (and any missing keys) to each result.

    ``ratio_fwd_bwd`` is the median time over that of one forward + backward pass measured
    in the same run (``baseline_ms``, stored with each result, so that results merged from
    runs on a differently loaded host keep their own baseline; the current baseline where a
    result has none);
    ``ratio_curvop`` is the median time over that of the task's curvop reference entry (the
    first of :data:`benchmarks.competitors.REFERENCE` that ran, stored as ``reference``);
    ``None`` where either time is missing.

    Args:
        results: Result dicts of one problem and device.
    """
    for r in results:
        for key, default in RESULT_DEFAULTS.items():
            r.setdefault(key, default)
    median = {r["entry"]: r.get("median_ms") for r in results}
    base = median.get(BASELINE)
    for r in results:
        candidates = REFERENCE.get(r.get("task"), [])
        ref_name = next((c for c in candidates if median.get(c) is not None), None)
        t, ref = r.get("median_ms"), median.get(ref_name) if ref_name else None
        r["reference"] = ref_name
        own = r.get("baseline_ms") or base
        r["ratio_fwd_bwd"] = t / own if t is not None and own else None
        r["ratio_curvop"] = t / ref if t is not None and ref else None


def _json_path(out: Path, problem: str, device: str, quick: bool) -> Path:
    return out / f"{problem}_{device}{'_quick' if quick else ''}.json"


def _merge(path: Path, machine: dict, results: list[dict]) -> list[dict]:
    """Keep earlier results of entries not rerun, if they came from the same machine."""
    if not path.exists():
        return results
    old = json.loads(path.read_text())
    keys = ("cpu", "torch", "threads", "gpu")
    if any(old.get("machine", {}).get(k) != machine.get(k) for k in keys):
        return results
    rerun = {r["entry"] for r in results}
    kept = [r for r in old.get("results", []) if r["entry"] not in rerun]
    order = {name: i for i, name in enumerate(ENTRIES)}
    return sorted(kept + results, key=lambda r: order.get(r["entry"], len(order)))


def _wait_idle(threshold: float, max_wait_s: float) -> float:
    """Wait until other processes use fewer than ``threshold`` cores; return that load."""
    t0, load = time.perf_counter(), other_load()
    while load > threshold and time.perf_counter() - t0 < max_wait_s:
        load = other_load(1.0)
    return load


def _eig_references(problem: str, names: list[str], args: argparse.Namespace) -> None:
    """Compute (and cache) the float64 reference eigenvalues of the eig tasks up front.

    The entries' children then read them from the cache (see
    :func:`benchmarks.check.eig_reference`) instead of spending their time limit on them.
    """
    from benchmarks.check import EIG_TASKS, eig_reference
    from benchmarks.competitors import EIG_K

    for task in dict.fromkeys(ENTRIES[n].task for n in names):
        if task in EIG_TASKS:
            t0 = time.perf_counter()
            eig_reference(problem, args.quick, task, EIG_K, args.device)
            print(f"  ({task}: float64 reference eigenvalues in "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)


def _measure(kwargs: dict[str, Any], args: argparse.Namespace, ctx: Any,
             timeout_scale: float = 1.0) -> dict[str, Any]:
    """Measure one entry; rerun it once if the host was busy with other work meanwhile."""
    if args.isolation == "none":
        t0 = time.perf_counter()
        res = measure_entry(**kwargs)
        res["wall_s"] = time.perf_counter() - t0
        return res
    timeout = args.timeout * timeout_scale
    res = run_isolated(kwargs, timeout, ctx)
    if (res.get("other_cpu_load") or 0.0) > args.busy:
        if _wait_idle(args.busy / 2, args.idle_wait) > args.busy:
            return res  # still busy: a rerun would not be cleaner (--redo-busy later)
        again = run_isolated(kwargs, timeout, ctx)
        if (again.get("other_cpu_load") or 0.0) < res["other_cpu_load"]:
            res = again
        res["rerun_busy"] = True
    return res


def _busy_entries(path: Path, busy: float) -> list[str]:
    """Entries of an earlier result file measured while other processes were busy."""
    if not path.exists():
        return []
    results = json.loads(path.read_text()).get("results", [])
    return [r["entry"] for r in results
            if (r.get("other_cpu_load") or 0.0) > busy and r["entry"] in ENTRIES]


def _line(r: dict[str, Any]) -> str:
    if r.get("median_ms") is not None:
        what = f"{r['median_ms']:10.2f} ms  {r.get('peak_mem_mb') or 0:8.1f} MB"
        if r.get("status") != "ok":
            what += f"  {r.get('status', '?').upper()}: {(r.get('error') or '')[:70]}"
    else:
        what = f"{r.get('status', '?').upper()}: {(r.get('error') or '')[:90]}"
    if "check_rel_err" in r or "check_error" in r:
        what += f"  check: {r.get('check_rel_err', r.get('check_error'))}"
    if "eig_rel_err" in r or "eig_error" in r:
        what += (f"  λ err {r['eig_rel_err']:.1e} resid {r['eig_residual']:.1e}"
                 if "eig_rel_err" in r else f"  eig check: {r['eig_error'][:60]}")
        what += f" {r.get('eig_counts', '')}"
    load = r.get("other_cpu_load")
    busy = f" busy={load:.1f}" if load else ""
    return f"  {r.get('task', ''):17s} {r['entry']:42s} {what}  [{r.get('wall_s', 0):.1f}s{busy}]"


def main(argv: list[str] | None = None) -> int:
    """Run the selected problems and entries, write the JSON files and the README.

    Args:
        argv: Command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        Exit code 0.
    """
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the running child is killed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    names = select_entries(args.tasks, args.entries)
    if args.list:
        for name in names:
            print(f"{ENTRIES[name].task:18s} {name}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.device, args.threads)
    libraries = LIBRARY_MODULES if args.preload == "all" else {ENTRIES[n].library for n in names}
    ctx = fork_context([m for lib in LIBRARY_MODULES if lib in libraries
                        for m in LIBRARY_MODULES[lib]])
    t_start = time.perf_counter()
    print(f"{len(names)} entries x {len(args.problems)} problems on {machine['cpu']}, "
          f"{args.threads} threads, device {args.device}", flush=True)
    for problem in args.problems:
        info = make_problem(problem, quick=args.quick, device=args.device).info()
        _wait_idle(args.busy / 2, args.idle_wait)
        print(f"[{problem}] P={info['num_params']} B={info['batch_size']}", flush=True)
        path = _json_path(args.out, problem, args.device, args.quick)
        todo = _busy_entries(path, args.busy) if args.redo_busy else names
        _eig_references(problem, todo, args)
        results = []
        if args.isolation == "interleave":
            t0 = time.perf_counter()
            for res in measure_interleaved(problem, todo, device=args.device, quick=args.quick,
                                           repeats=args.repeats, budget_s=args.budget,
                                           threads=args.threads, dense_gb=args.dense_gb):
                res.update(commit=machine["commit"], wall_s=time.perf_counter() - t0)
                results.append(res)
                print(_line(res), flush=True)
            todo = []
        for name in todo:
            kwargs = dict(problem=problem, entry=name, device=args.device, quick=args.quick,
                          repeats=args.repeats, budget_s=args.budget, threads=args.threads,
                          dense_gb=args.dense_gb, check=args.check)
            res = _measure(kwargs, args, ctx, TIMEOUT_SCALE.get(ENTRIES[name].task, 1.0))
            spec = ENTRIES[name]
            res.update(entry=name, library=spec.library, task=spec.task, note=spec.note,
                       commit=machine["commit"])
            results.append(res)
            print(_line(res), flush=True)
        base_ms = next((r.get("median_ms") for r in results if r["entry"] == BASELINE), None)
        for r in results:
            r["baseline_ms"] = base_ms
        if args.tasks or args.entries or args.redo_busy:
            results = _merge(path, machine, results)
        add_ratios(results)
        payload = {
            "problem": info,
            "device": args.device,
            "quick": args.quick,
            "machine": machine,
            "settings": {k: getattr(args, k) for k in ("repeats", "budget", "timeout", "threads",
                                                       "dense_gb", "isolation", "busy",
                                                       "preload", "check")},
            "reference": REFERENCE,
            "tasks": TASKS,
            "results": results,
        }
        path.write_text(json.dumps(payload, indent=1) + "\n")
    readme = write_readme(args.out)
    print(f"wrote {args.out}/*.json and {readme} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
