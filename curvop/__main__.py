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


def _lowrank(iface, loader):
    vecs, vals, loss = iface.eig_lowrank(loader)
    return loss, vals


def _summary(H):
    """Trace and top-3 eigenvalues of whatever a structure returned (None where not cheap)."""
    if isinstance(H, torch.Tensor) and H.dim() == 1:
        if H.numel() <= 3:
            return None, H.tolist()
        return H.sum().item(), None
    if isinstance(H, torch.Tensor):
        return H.trace().item(), torch.linalg.eigvalsh(H).flip(0)[:3].tolist()
    diag = H.diagonal()
    return diag.sum().item(), None


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
    ggn = curvop.TorchGGN(model, "classification", low_rank=3)
    loader = [(x[i: i + 128], y[i: i + 128]) for i in range(0, args.n, 128)]
    N = args.n
    structures = [
        ("GGN full", lambda: ggn.full(x, y)),
        ("GGN diag (exact)", lambda: ggn.diag(x, y)),
        ("GGN KFAC (Kron)", lambda: ggn.kron(x, y, N)),
        ("GGN matrix-free operator", lambda: ggn.full_operator(x, y)),
        ("GGN top-3 (eig_lowrank)", lambda: _lowrank(ggn, loader)),
        ("MC Fisher full (8 samples)", lambda: curvop.TorchGGN(
            model, "classification", stochastic=True, num_samples=8,
            generator=torch.Generator().manual_seed(1)).full(x, y)),
        ("EF full", lambda: curvop.TorchEF(model, "classification").full(x, y)),
        ("Hessian top-3 (eig_lowrank)", lambda: _lowrank(
            curvop.TorchHessian(model, "classification", low_rank=3), loader)),
    ]
    results = {}
    for name, fn in tqdm(structures, desc="curvatures", leave=False):
        start = time.perf_counter()
        loss, H = fn()
        elapsed = time.perf_counter() - start
        results[name] = H
        trace, top = _summary(H)
        rows.append((name, float(loss), trace, top, elapsed))

    print(f"{'structure':<28} {'loss':>9} {'trace':>11} {'top-3 eigenvalues':>30} {'time':>9}")
    for name, loss, trace, top, elapsed in rows:
        eig = "" if top is None else ", ".join(f"{v:.3g}" for v in top)
        tr = "" if trace is None else f"{trace:11.4g}"
        print(f"{name:<28} {loss:9.3f} {tr:>11} {eig:>30} {elapsed * 1e3:7.1f}ms")
    op = results["GGN matrix-free operator"]
    v = torch.randn(P, dtype=torch.float64)
    prod_err = (op @ v - results["GGN full"] @ v).abs().max().item()
    print(f"\ncheck: |op @ v - H v| = {prod_err:.1e}")
    diag_err = (results["GGN diag (exact)"] - results["GGN full"].diagonal()).abs().max().item()
    print(f"\ncheck: |diag - diagonal(full)| = {diag_err:.1e} (float64)")


if __name__ == "__main__":
    main()
