"""Smoke test of the benchmark suite: a quick run on one tiny problem writes valid results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RESULT_FIELDS = {
    "entry", "library", "task", "status", "median_ms", "times_ms", "warmup_ms",
    "peak_mem_mb", "error", "ratio_fwd_bwd", "ratio_curvop", "reference", "wall_s",
}


def _run_suite(args: list[str], out: Path, result: str, timeout: float):
    """Run ``python -m benchmarks.run ARGS --out OUT``: the payload of ``OUT/RESULT``, its
    entries by name, and the finished process."""
    cmd = [sys.executable, "-m", "benchmarks.run", *args, "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads((out / result).read_text())
    return payload, {r["entry"]: r for r in payload["results"]}, proc


@pytest.mark.benchmark
def test_quick_run_writes_json_and_readme(tmp_path):
    payload, entries, _ = _run_suite([
        "--quick", "--problems", "mlp", "--tasks", "baseline", "ggn_product",
        "--entries", "torch.*", "curvop.TorchGGN.matvec", "curvlinops.GGNLinearOperator.matvec",
        "--preload", "needed", "--repeats", "1", "--budget", "0.1",
        "--timeout", "20", "--busy", "100", "--check",
    ], tmp_path, "mlp_cpu_quick.json", 120)
    assert payload["quick"] is True and payload["device"] == "cpu"
    assert payload["problem"]["num_params"] > 0
    assert {"cpu", "torch", "threads", "versions"} <= set(payload["machine"])
    assert {"torch.fwd_bwd", "curvlinops.GGNLinearOperator.matvec"} <= set(entries)
    assert "curvop.TorchGGN.matvec" in entries
    for r in payload["results"]:
        assert RESULT_FIELDS <= set(r), r["entry"]
        assert r["status"] in {"ok", "error", "skipped", "timeout", "invalid"}
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["peak_mem_mb"] is not None
        else:
            assert r["error"], r["entry"]
    base = entries["torch.fwd_bwd"]
    assert base["status"] == "ok" and base["ratio_fwd_bwd"] == pytest.approx(1.0)
    peer = entries["curvlinops.GGNLinearOperator.matvec"]
    assert peer["status"] == "ok" and peer["ratio_fwd_bwd"] > 0
    assert "check_rel_err" in peer or "check_error" in peer
    if entries.get("curvop.TorchGGN.matvec", {}).get("status") == "ok":
        assert peer["check_rel_err"] < 1e-4  # float32 GGN-vector products agree

    readme = (tmp_path / "README.md").read_text()
    assert "mlp (quick)" in readme and "× fwd+bwd" in readme


@pytest.mark.benchmark
def test_quick_run_eigen_and_laplace_tasks(tmp_path):
    """The eig and laplace tasks run in --quick mode; eig pairs and posteriors are right."""
    _, entries, proc = _run_suite([
        "--quick", "--problems", "mlp_small",
        "--tasks", "baseline", "eig_top10", "laplace_diag", "laplace_kron",
        "--entries", "torch.*", "curvop.TorchGGN.eig_lowrank",
        "curvlinops.GGNLinearOperator.eigsh", "curvop.CurvopGGN[[]*", "laplace.CurvlinopsGGN[[]*",
        "--preload", "needed", "--repeats", "1", "--budget", "0.1",
        "--timeout", "30", "--busy", "100", "--check",
    ], tmp_path, "mlp_small_cpu_quick.json", 240)
    assert set(entries) == {
        "torch.fwd_bwd", "curvop.TorchGGN.eig_lowrank", "curvlinops.GGNLinearOperator.eigsh",
        "curvop.CurvopGGN[diag].fit", "curvop.CurvopGGN[kron].fit",
        "laplace.CurvlinopsGGN[diag].fit", "laplace.CurvlinopsGGN[kron].fit",
    }, proc.stdout
    for r in entries.values():
        assert r["status"] == "ok", (r["entry"], r["error"])
        assert RESULT_FIELDS <= set(r) and r["ratio_fwd_bwd"] > 0
    for name in ("curvop.TorchGGN.eig_lowrank", "curvlinops.GGNLinearOperator.eigsh"):
        r = entries[name]
        assert r["eig_k"] == 10
        assert r["eig_rel_err"] < 1e-5 and r["eig_residual"] < 1e-3 and r["eig_orth"] < 1e-5
        assert sum(r["eig_counts"].values()) > 0  # operator work was counted
    assert entries["curvlinops.GGNLinearOperator.eigsh"]["eig_counts"]["products"] >= 10
    assert entries["curvop.TorchGGN.eig_lowrank"]["reference"] == "curvop.TorchGGN.eig_lowrank"
    for structure in ("diag", "kron"):
        peer = entries[f"laplace.CurvlinopsGGN[{structure}].fit"]
        assert peer["reference"] == f"curvop.CurvopGGN[{structure}].fit"
        assert peer["check_rel_err"] < 1e-4, peer  # same posterior precision

    readme = (tmp_path / "README.md").read_text()
    assert "max rel. residual" in readme and "laplace_kron" in readme


@pytest.mark.benchmark
def test_interleaved_run_times_entries_in_turns(tmp_path):
    """``--isolation interleave``: every entry timed in several rounds, in one process; an
    entry that changes its model (BackPACK's ``extend``) does not reach the others."""
    args = [
        "--quick", "--problems", "mlp", "--tasks", "baseline", "ggn_product", "kfac_mc",
        "eig_top10",
        "--entries", "torch.*", "curvop.TorchGGN.matvec", "curvlinops.GGNLinearOperator.matvec",
        "backpack.KFAC", "curvop.TorchGGN[[]mc].kron", "curvop.TorchGGN.eig_lowrank",
        "--isolation", "interleave", "--repeats", "4", "--budget", "0.1", "--threads", "1",
    ]
    _, entries, _ = _run_suite(args, tmp_path, "mlp_cpu_quick.json", 180)
    assert set(entries) == {
        "torch.fwd_bwd", "curvop.TorchGGN.matvec", "curvlinops.GGNLinearOperator.matvec",
        "backpack.KFAC", "curvop.TorchGGN[mc].kron", "curvop.TorchGGN.eig_lowrank"}
    for r in entries.values():
        assert r["status"] == "ok", (r["entry"], r["error"])
        assert r["interleaved"] and RESULT_FIELDS <= set(r)
        assert len(r["times_ms"]) >= 4 and r["peak_mem_mb"] is not None
    assert entries["torch.fwd_bwd"]["ratio_fwd_bwd"] == pytest.approx(1.0)
    eig = entries["curvop.TorchGGN.eig_lowrank"]
    assert eig["eig_rel_err"] < 1e-5 and sum(eig["eig_counts"].values()) > 0

    cmd = [sys.executable, "-m", "benchmarks.run", *args, "--out", str(tmp_path), "--check"]
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert bad.returncode != 0 and "--check" in bad.stderr
