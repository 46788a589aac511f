"""``python -m curvop``: the curvature of a freshly trained network, at a glance.

Trains a small MLP on built-in synthetic data (three Gaussian blobs in 2-D, no downloads) for a
few seconds, then computes each curvature structure and prints parameter count, loss, traces,
top eigenvalues and timings.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

import curvop


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian blobs in 2-D: ``x`` `(n, 2)`, ``y`` `(n,)` in {0, 1, 2}."""
    centres = torch.tensor([[0.0, 2.0], [-1.7, -1.0], [1.7, -1.0]])
    y = torch.randint(0, 3, (n,), generator=generator)
    x = centres[y] + 0.8 * torch.randn(n, 2, generator=generator)
    return x, y


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Full-batch Adam on the mean cross-entropy; returns the final training accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in tqdm(range(steps), desc="training", leave=False):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return (model(x).argmax(-1) == y).double().mean().item()


def main(argv: list[str] | None = None) -> None:
    """Run the demo."""
    parser = argparse.ArgumentParser(prog="curvop", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--n", type=int, default=512, help="data points")
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, y = make_data(args.n, gen)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 3),
    ).double()
    x = x.double()
    acc = train(model, x, y, args.steps)
    P = sum(p.numel() for p in model.parameters())
    print(f"curvop {curvop.__version__} demo: 2-32-32-3 tanh MLP, {P} parameters, "
          f"{args.n} points, train accuracy {acc:.1%}\n")

    rows = []
    structures = [
        ("GGN full", lambda: curvop.TorchGGN(model, "classification").full(x, y)),
        ("GGN diag", lambda: curvop.TorchGGN(model, "classification").diag(x, y)),
        ("MC Fisher full (8 samples)", lambda: curvop.TorchGGN(
            model, "classification", stochastic=True, num_samples=8,
            generator=torch.Generator().manual_seed(1)).full(x, y)),
        ("EF full", lambda: curvop.TorchEF(model, "classification").full(x, y)),
        ("Hessian full", lambda: curvop.TorchHessian(model, "classification").full(x, y)),
        ("Hessian diag", lambda: curvop.TorchHessian(model, "classification").diag(x, y)),
    ]
    results = {}
    for name, fn in tqdm(structures, desc="curvatures", leave=False):
        start = time.perf_counter()
        loss, H = fn()
        elapsed = time.perf_counter() - start
        results[name] = H
        trace = H.trace() if H.dim() == 2 else H.sum()
        top = torch.linalg.eigvalsh(H).flip(0)[:3].tolist() if H.dim() == 2 else None
        rows.append((name, loss.item(), trace.item(), top, elapsed))

    print(f"{'structure':<28} {'loss':>9} {'trace':>11} {'top-3 eigenvalues':>30} {'time':>9}")
    for name, loss, trace, top, elapsed in rows:
        eig = "" if top is None else ", ".join(f"{v:.3g}" for v in top)
        print(f"{name:<28} {loss:9.3f} {trace:11.4g} {eig:>30} {elapsed * 1e3:7.1f}ms")
    diag_err = (results["GGN diag"] - results["GGN full"].diagonal()).abs().max().item()
    print(f"\ncheck: |diag - diagonal(full)| = {diag_err:.1e} (float64)")


if __name__ == "__main__":
    main()
