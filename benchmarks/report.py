"""Machine description and the markdown report built from the result JSON files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchmarks.problems import PROBLEMS

__all__ = ["machine_info", "render_markdown", "write_readme"]

_DISTRIBUTIONS = ("torch", "linear_operator", "curvlinops-for-pytorch", "backpack-for-pytorch",
                  "laplace-torch", "asdfghjkl", "curvop")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _git_commit() -> str | None:
    """Short commit of the repository, with ``+dirty`` if ``curvop/`` has local changes.

    ``CURVOP_COMMIT`` in the environment wins: a copy of the working tree on another machine
    (the GPU session, see ``benchmarks/gpu/session.sh``) may carry no or a stale ``.git``.
    """
    if os.environ.get("CURVOP_COMMIT"):
        return os.environ["CURVOP_COMMIT"]
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--", "../curvop"):
        commit += "+dirty"
    return commit or None


def machine_info(device: str, threads: int) -> dict[str, Any]:
    """Describe the machine and the software the benchmark runs on.

    Args:
        device: ``'cpu'`` or ``'cuda'``.
        threads: Torch threads used by the measured processes.

    Returns:
        CPU model, logical cores, GPU name (CUDA), threads, Python and package versions,
        the repository commit and the UTC date.
    """
    versions = {}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "gpu": gpu,
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "commit": _git_commit(),
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _num(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "–"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.{digits}f}"


def _cell(text: str | None, width: int = 160) -> str:
    text = (text or "").replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _check_cell(r: dict[str, Any]) -> str:
    if "check_rel_err" in r:
        return f"{r['check_rel_err']:.1e}"
    return _cell(r.get("check_error"), 60) if "check_error" in r else ""


def _problem_section(payload: dict[str, Any]) -> list[str]:
    info, machine = payload["problem"], payload["machine"]
    title = info["name"] + (" (quick)" if payload.get("quick") else "")
    base = next((r for r in payload["results"] if r["task"] == "baseline"), {})
    lines = [
        f"## {title} — {payload['device']}",
        "",
        f"P = {info['num_params']:,} parameters, batch {info['batch_size']}, "
        f"{info['num_outputs']} classes, input {tuple(info['input_shape'])}, "
        f"{'train' if info['training_mode'] else 'eval'} mode; modules: "
        f"{', '.join(m for m in info['modules'] if m not in ('Sequential',))}. "
        f"One forward+backward: {_num(base.get('median_ms'))} ms. "
        f"Measured {machine['date']} at commit {machine.get('commit')} on "
        f"{machine.get('gpu') or machine['cpu']} (torch {machine.get('torch')})."
        + (" Timed interleaved: the entries in turns, one untimed and two timed calls each per "
           "round, in one process (`--isolation interleave`)."
           if any(r.get("interleaved") for r in payload["results"]) else ""),
        "",
    ]
    checked = any("check_rel_err" in r or "check_error" in r for r in payload["results"])
    lines += [
        "| task | entry | median ms | × fwd+bwd | × curvop | peak MB | "
        + ("rel. err vs curvop | " if checked else "") + "status / error |",
        "|---|---|---:|---:|---:|---:|" + ("---:|" if checked else "") + "---|",
    ]
    busy_limit = payload.get("settings", {}).get("busy", 0.5)
    for r in payload["results"]:
        notes = []
        load = r.get("other_cpu_load") or 0.0
        if load > busy_limit:
            notes.append(f"host busy ({load:.1f} other cores)")
        if r.get("status") != "ok":
            notes.append(f"**{r.get('status')}**: {r.get('error') or ''}")
        lines.append(
            f"| {r['task']} | `{r['entry']}` | {_num(r.get('median_ms'))} | "
            f"{_num(r.get('ratio_fwd_bwd'))} | {_num(r.get('ratio_curvop'))} | "
            f"{_num(r.get('peak_mem_mb'), 1)} | "
            + (f"{_check_cell(r)} | " if checked else "")
            + f"{_cell('; '.join(notes))} |"
        )
    return lines + _eig_table(payload) + [""]


def _counts_cell(counts: dict[str, int] | None) -> str:
    if not counts:
        return "–"
    names = {"products": "products", "jvp_columns": "JVP cols", "vjp_columns": "VJP cols",
             "gram": "Gram"}
    return ", ".join(f"{v} {names.get(k, k)}" for k, v in counts.items())


def _eig_table(payload: dict[str, Any]) -> list[str]:
    """Accuracy and products of the eig entries (always measured, not only with --check)."""
    rows = [r for r in payload["results"] if "eig_k" in r or "eig_error" in r]
    if not rows:
        return []
    lines = [
        "",
        "Eigenpairs (`eig_*` tasks): pairs returned; largest relative eigenvalue error against "
        "float64 ARPACK (`tol=1e-12`) on the same problem upcast to float64; largest relative "
        "residual ‖A u − λ u‖ / λ with A in float64; largest |UᵀU − I|; operator work of one "
        "call.",
        "",
        "| task | entry | × fwd+bwd | pairs | max rel. λ error | max rel. residual | "
        "max orth. error | operator work |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "eig_error" in r:
            acc = f"{_cell(r['eig_error'], 60)} | | |"
        else:
            acc = " | ".join(f"{r[k]:.1e}" if k in r else "–"
                             for k in ("eig_rel_err", "eig_residual", "eig_orth")) + " |"
        lines.append(f"| {r['task']} | `{r['entry']}` | {_num(r.get('ratio_fwd_bwd'))} | "
                     f"{r.get('eig_k', '–')} | {acc} {_counts_cell(r.get('eig_counts'))} |")
    return lines


def _summary(payloads: list[dict[str, Any]]) -> list[str]:
    """One row per (problem, task): curvop's time and the fastest other entry's."""
    lines = [
        "## Summary",
        "",
        "Per problem and task: the curvop reference entry (time, × one forward+backward) and "
        "the fastest entry of another library that ran correctly (time relative to curvop; below "
        "1 = faster than curvop).",
        "",
        "| problem | task | curvop ms (reference) | curvop × fwd+bwd | fastest other | "
        "its × curvop |",
        "|---|---|---:|---:|---|---:|",
    ]
    for payload in payloads:
        by_task: dict[str, list[dict]] = {}
        for r in payload["results"]:
            by_task.setdefault(r["task"], []).append(r)
        for task, rows in by_task.items():
            if task == "baseline":
                continue
            ref_name = rows[0].get("reference") or payload.get("reference", {}).get(task, [""])[0]
            ref = next((r for r in rows if r["entry"] == ref_name), None)
            ok = [r for r in rows if r.get("library") != "curvop" and r.get("status") == "ok"
                  and r.get("median_ms") is not None]
            best = min(ok, key=lambda r: r["median_ms"], default=None)
            if ref is None or (ref.get("median_ms") is None and best is None):
                continue
            curvop = (f"{_num(ref.get('median_ms'))} (`{ref['entry']}`)"
                      if ref.get("median_ms") is not None else ref.get("status", "–"))
            name = "quick " if payload.get("quick") else ""
            dev = "" if payload["device"] == "cpu" else f" ({payload['machine'].get('gpu')})"
            lines.append(
                f"| {name}{payload['problem']['name']}{dev} | {task} | {curvop} | "
                f"{_num(ref.get('ratio_fwd_bwd'))} | "
                f"{'`' + best['entry'] + '`' if best else '–'} | "
                f"{_num(best.get('ratio_curvop')) if best else '–'} |"
            )
    return lines + [""]


def render_markdown(payloads: list[dict[str, Any]], others: Sequence[str] = ()) -> str:
    """Render the report for a list of result payloads (one per problem and device).

    Args:
        payloads: Contents of ``<problem>_<device>.json`` files.
        others: File names of the other suites' markdown results in the same folder, linked.

    Returns:
        Markdown text.
    """
    lines = ["# curvop benchmarks", ""]
    if not payloads:
        return "\n".join(lines + ["No results yet: run `python -m benchmarks.run`.", ""])
    m = payloads[0]["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines += [
        "Generated by `python -m benchmarks.run` (see `benchmarks/run.py --help`); "
        "every (problem, entry) runs in a fresh child process.",
        "",
        f"- Machine: {m['cpu']}, {m['logical_cores']} logical cores"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + f"; torch threads {m['threads']}; Python {m['python']}; {m['platform']}.",
        *[f"- Machine of the {p['device']} results: {p['machine']['cpu']}, "
          f"{p['machine']['logical_cores']} logical cores, GPU {p['machine'].get('gpu')}; torch "
          f"{p['machine'].get('torch')}; Python {p['machine']['python']}; "
          f"{p['machine']['platform']}."
          for p in {(q["device"], q["machine"].get("gpu")): q for q in payloads
                    if q["device"] != payloads[0]["device"]}.values()],
        f"- Packages: {versions}.",
        f"- Settings: {payloads[0].get('settings')}.",
        *([f"- Other results in this folder: {', '.join(f'`{n}`' for n in others)} "
           "(`benchmarks.kron_bench`, `benchmarks.linalg_bench`, GPU run logs)."]
          if others else []),
        "- **median ms**: median wall time of the timed calls after one warm-up call "
        "(`perf_counter`, CUDA synchronised); setup (building interfaces and operators, "
        "BackPACK `extend`) is not timed, except in `operator_build` and the KFAC "
        "entries, where building is the task.",
        "- **× fwd+bwd**: median over that of one forward + backward pass of the summed loss "
        "(`torch.fwd_bwd`). **× curvop**: median over that of the task's curvop "
        "reference entry (below 1 means faster than curvop).",
        "- **peak MB**: peak memory above the process after building model and data, over "
        "the setup and the warm-up call. CPU: peak RSS (`VmHWM`, reset through "
        "`/proc/self/clear_refs`) minus RSS before — all pages touched, an upper bound on "
        "tensor memory. CUDA: `max_memory_allocated` minus `memory_allocated` before.",
        "- **host busy**: other processes kept that many cores busy during the measurement "
        "(after one rerun), so that time is inflated.",
        "- **eig tasks**: the pairs of every entry are checked on every problem (not only with "
        "`--check`) against the problem upcast to float64; see the table under each problem. "
        "`operator work` counts the columns multiplied by the curvature (products) or, on "
        "curvop's data-space dual route, the Gram matrices assembled and the JVP/VJP columns.",
        "- **laplace tasks**: the whole `Laplace(...)` construction and `fit` over a "
        "`DataLoader` of 4 batches of the problem's batch size (the problem's batch, then "
        "seeded draws like it), laplace-torch's own overhead included; × fwd+bwd is still "
        "relative to one forward+backward of one batch. With `--check` the posterior "
        "precisions are compared.",
        "- **rel. err vs curvop** (only with `--check`): relative Frobenius distance of the "
        "entry's result to the curvop reference's, after bringing both to a common dense form "
        "(Monte-Carlo tasks are not compared).",
        "- **skipped**: the dense result would exceed `--dense-gb`; **error**: the library "
        "raised (message shown); **timeout**: killed after `--timeout` seconds; **invalid**: it "
        "ran but its Kronecker factors leave out parameters of unsupported layers.",
        "- Tasks: " + "; ".join(f"`{k}` {v}" for k, v in payloads[0]["tasks"].items()) + ".",
        "",
    ]
    order = {name: i for i, name in enumerate(PROBLEMS)}
    payloads = sorted(payloads, key=lambda p: (p.get("quick", False), p["device"],
                                               order.get(p["problem"]["name"], 99)))
    lines += _summary(payloads)
    for payload in payloads:
        lines += _problem_section(payload)
    return "\n".join(lines)


def write_readme(out: Path) -> Path:
    """Rebuild ``<out>/README.md`` from every ``*.json`` result file in ``out``.

    Args:
        out: The results folder.

    Returns:
        The path of the README.
    """
    payloads = []
    for path in sorted(Path(out).glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        # other scripts may leave their own JSON files here; keep only this suite's
        if isinstance(payload, dict) and isinstance(payload.get("results"), list) and isinstance(
                payload.get("problem"), dict) and "machine" in payload:
            payloads.append(payload)
    readme = Path(out) / "README.md"
    others = sorted(p.name for p in Path(out).glob("*.md") if p.name != "README.md")
    readme.write_text(render_markdown(payloads, others))
    return readme


if __name__ == "__main__":  # python -m benchmarks.report [DIR]: rebuild DIR/README.md
    import sys

    print(write_readme(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"))
