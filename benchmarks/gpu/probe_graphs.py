"""Probe: can the cached products of an operator be replayed as CUDA graphs, and what it saves.

    python -m benchmarks.gpu.probe_graphs --problems mlp cnn

For each problem and operator (GGN, Hessian) and column count, three ways of capturing one
product ``V ↦ op @ V`` into a ``torch.cuda.CUDAGraph`` are tried, each reported as captured or
not (with the error), its replay's largest relative difference from the eager product, and
its time (copy in, replay, copy out) next to the eager product and one forward + backward:

- ``default``: the operator's own cached graph (``op.products``; recorded on a stream of its own
  since a first probe, on an H100 with torch 2.11, found that one recorded on the legacy default
  stream cannot be captured: "operation would make the legacy stream depend on a capturing
  blocking stream");
- ``side``: the operator's cached graph recorded on a side stream of its own;
- ``rebuild``: the linearisation itself recorded inside the capture (forward included).
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import torch

from benchmarks.competitors import _baseline
from benchmarks.problems import make_problem
from curvop import TorchGGN, TorchHessian


def _ms(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(1e3 * (time.perf_counter() - t))
    return statistics.median(out)


def _capture(fn, V):
    """A replay function for ``fn`` at inputs like ``V`` (static buffers), or raise."""
    static_in = V.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)

    def replay(X):
        static_in.copy_(X)
        graph.replay()
        return static_out.clone()

    return replay


def _one(name: str, cls, k: int) -> None:
    problem = make_problem(name, device="cuda")
    base = _ms(_baseline(problem))
    iface = cls(problem.model, problem.likelihood)
    _, op = iface.full_operator(problem.x, problem.y)
    V = torch.randn(k, problem.num_params, device="cuda")
    products = op.products
    eager = products.matmat(V)
    t_eager = _ms(lambda: products.matmat(V))
    t_op = _ms(lambda: op @ (V[0] if k == 1 else V.T))
    print(f"== {name} {cls.__name__} k={k}: fwd+bwd {base:.3f} ms, eager matmat {t_eager:.3f} "
          f"({t_eager / base:.2f}x), op @ v {t_op:.3f} ({t_op / base:.2f}x)", flush=True)

    def side_products():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            p = op._make_products()
        torch.cuda.current_stream().wait_stream(s)
        return p

    ways = {
        "default": lambda: products.matmat,
        "side": lambda: side_products().matmat,
        "rebuild": lambda: (lambda X: op._make_products().matmat(X)),
    }
    for way, make in ways.items():
        try:
            replay = _capture(make(), V)
            got = replay(V)
            err = float((got - eager).norm() / eager.norm())
            got2 = replay(2 * V)
            err2 = float((got2 - 2 * eager).norm() / (2 * eager).norm())
            t = _ms(lambda r=replay: r(V))
            print(f"   {way:8s} captured: rel diff {err:.2e} / {err2:.2e}, {t:.3f} ms "
                  f"({t / base:.2f}x fwd+bwd, {t_eager / t:.1f}x faster than eager)", flush=True)
        except Exception as e:  # noqa: BLE001 - a probe reports every failure
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            print(f"   {way:8s} FAILED: {last[:300]}", flush=True)
            torch.cuda.synchronize()


def main() -> None:
    """Run the probe over problems, operators and column counts."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=["mlp", "cnn"])
    ap.add_argument("--k", nargs="+", type=int, default=[1, 16])
    args = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for name in args.problems:
        for cls in (TorchGGN, TorchHessian):
            for k in args.k:
                try:
                    _one(name, cls, k)
                except Exception as e:  # noqa: BLE001
                    print(f"== {name} {cls.__name__} k={k} FAILED: {e!r}"[:400], flush=True)


if __name__ == "__main__":
    main()
