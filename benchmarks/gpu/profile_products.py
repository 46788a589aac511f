"""Where the time of a GGN product and of KFAC goes on a GPU: wall times, profiler tables.

Run by ``benchmarks/gpu/session.sh`` after the benchmarks. For each problem it times one
forward + backward, building the operator and one product (CUDA-synchronised medians), and
prints the profiler's top operators of a few products by CUDA time and by CPU time, so a
session without a GPU can see whether a product is bound by kernels or by Python and
launches (one H100 kernel of the MLP takes microseconds).

    python -m benchmarks.gpu.profile_products --problems mlp cnn --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.competitors import _baseline
from benchmarks.problems import make_problem
from curvop import TorchGGN


def _median_ms(fn, device: torch.device, repeats: int = 20) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    """Time and profile one problem after another."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=["mlp", "cnn"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    for name in args.problems:
        _one(name, device, activities)


def _one(name: str, device: torch.device, activities: list) -> None:
    """Time and profile one problem."""
    problem = make_problem(name, device=device)
    model, x, y = problem.model, problem.x, problem.y
    fwd_bwd = _baseline(problem)  # the suite's own forward + backward of the summed loss

    iface = TorchGGN(model, problem.likelihood)
    _, op = iface.full_operator(x, y)
    v = torch.randn(problem.num_params, device=device)
    base = _median_ms(fwd_bwd, device)
    build = _median_ms(lambda: iface.full_operator(x, y), device)
    prod = _median_ms(lambda: op @ v, device)
    print(f"== {name} on {device} (P={problem.num_params}, B={problem.batch_size}): "
          f"fwd+bwd {base:.3f} ms, build {build:.3f} ms ({build / base:.2f}x), "
          f"product {prod:.3f} ms ({prod / base:.2f}x)", flush=True)
    exact = lambda: iface.kron(x, y, problem.batch_size)  # noqa: E731
    mc_iface = TorchGGN(model, problem.likelihood, stochastic=True)
    mc = lambda: mc_iface.kron(x, y, problem.batch_size)  # noqa: E731
    kron_ms, mc_ms = _median_ms(exact, device, 10), _median_ms(mc, device, 10)
    print(f"== {name} kron: exact {kron_ms:.3f} ms ({kron_ms / base:.2f}x), "
          f"MC {mc_ms:.3f} ms ({mc_ms / base:.2f}x)", flush=True)
    for label, fn in (("product", lambda: op @ v), ("fwd+bwd", fwd_bwd), ("kron", exact),
                      ("kron[mc]", mc)):
        with profile(activities=activities) as prof:
            for _ in range(5):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        keys = ["self_cuda_time_total", "cpu_time_total"] if device.type == "cuda" \
            else ["cpu_time_total"]
        for key in keys:
            print(f"-- {name} {label}, 5 calls, sorted by {key}")
            print(prof.key_averages().table(sort_by=key, row_limit=14,
                                            max_name_column_width=60))


if __name__ == "__main__":
    main()
