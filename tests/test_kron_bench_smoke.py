"""Smoke test of ``python -m benchmarks.kron_bench``: a quick run writes valid, accurate results."""

from __future__ import annotations

import json

import pytest

from benchmarks import kron_bench


@pytest.mark.benchmark
def test_quick_kron_bench_writes_accurate_results(tmp_path):
    res = kron_bench.main(["--quick", "--repeats", "1", "--batches", "2", "--out",
                           str(tmp_path)])
    saved = json.loads((tmp_path / "kron_cpu_quick.json").read_text())
    assert saved["quick"] is True and saved["problem"]["P"] == res["problem"]["P"] == 659
    assert saved["problem"]["N"] == 16
    md = (tmp_path / "kron_cpu_quick.md").read_text()
    assert "| K + δI |" in md and "per-parameter" in md.lower()

    for key in ("damped_scalar", "damped_per_block"):
        r = saved[key]
        assert r["solve_ms"] > 0 and r["logdet_ms"] > 0
        # float32 factors: exact eigenbasis solves leave a float32-level true residual
        assert r["rel_residual"] < 1e-4 and r["rel_residual16"] < 1e-4
    assert len(saved["damped_per_block"]["deltas"]) == len(saved["kfac"]["block_sizes"])
    # the exact damped log det of the last weight block (float64 factors) matches dense
    assert saved["damped_scalar"]["last_weight_block"]["rel_err"] < 1e-10
    grid = saved["grid"]
    assert len(grid["logdets"]) == len(grid["deltas"]) == 20
    assert all(a < b for a, b in zip(grid["logdets"], grid["logdets"][1:]))  # δ increases

    dp = saved["diag_prior"]
    assert dp["kind"] == "KronAddedDiag"
    assert dp["rel_residual"] < 10 * dp["options"]["rtol"]
    blk = dp["last_weight_block"]
    assert blk["plan"] == ["iter"]
    # the stated accuracy: estimate within a few standard errors (or 1e-8 relative) of dense
    assert blk["abs_err"] <= 4 * blk["stderr"] + 1e-8 * abs(blk["dense_float64"])
    assert blk["solve_rel_residual"] < 10 * dp["options"]["rtol"]
    assert saved["memory"]["dense_PxP_float32_mb"] == pytest.approx(659**2 * 4 / 2**20)
