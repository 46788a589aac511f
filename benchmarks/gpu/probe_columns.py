"""Several columns at once (``vmap``) or one by one: which is faster, per device and model.

GGN products with several vectors (:class:`curvop.operators._products.SqrtFormProducts`) and
exact KFAC (the columns of the output-Hessian root, ``curvop.kfac``) pick one of the two from
the layers in the graph; the choice was tuned on one CPU thread, where a convolution's batching
rule (a copy of its operands) costs more than a loop. This times both on the problems named,
so the choice can be made per device from figures; it also prints the profiler's top
operators of ``kron`` by CPU time, to show the fixed costs of a call on a fast device.

    python -m benchmarks.gpu.probe_columns --device cuda --problems mlp cnn transformer
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

import curvop.kfac as kfac_mod
import curvop.operators._products as products_mod
from benchmarks.competitors import _baseline
from benchmarks.gpu.profile_products import _median_ms
from benchmarks.problems import make_problem
from curvop import TorchGGN


def main() -> None:
    """Time each problem's matmat16 and kron with both column strategies."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", nargs="+", default=["mlp", "cnn", "transformer"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", nargs="*", default=["mlp", "cnn"])
    args = ap.parse_args()
    device = torch.device(args.device)
    for name in args.problems:
        _one(name, device, name in args.profile)


def _one(name: str, device: torch.device, with_profile: bool) -> None:
    """Time (and profile) one problem."""
    friendly, column_block = products_mod._batch_friendly, kfac_mod._column_block
    fold_columns = kfac_mod._fold_columns
    p = make_problem(name, device=device)
    model, x, y = p.model, p.x, p.y
    fwd_bwd = _baseline(p)  # the suite's own forward + backward of the summed loss

    base = _median_ms(fwd_bwd, device)
    row = [f"== {name} on {device}: fwd+bwd {base:.3f} ms"]
    V = torch.randn(p.num_params, 16, device=device)
    # every mode twice, the first round a warm-up: the mode timed first pays for it otherwise
    # kron: "fold" backpropagates the columns as copies of the batch, "vmap" with
    # is_grads_batched, "loop" one by one; products know "vmap" and "loop" ("fold" = "vmap")
    for rnd, mode in [(r, m) for r in range(2) for m in ("auto", "fold", "vmap", "loop")]:
        if rnd == 1 and mode == "auto":
            del row[1:]
        products_mod._batch_friendly = {"auto": friendly, "loop": lambda out: False}.get(
            mode, lambda out: True)
        kfac_mod._column_block = {"auto": column_block, "loop": lambda m, K, dev: 1}.get(
            mode, lambda m, K, dev: K)
        kfac_mod._fold_columns = {"auto": fold_columns, "fold": lambda dev: True}.get(
            mode, lambda dev: False)
        kfac_mod._SAMPLE_BYTES.clear()  # the block is remembered per model with the sizes
        try:
            _, op = TorchGGN(model, p.likelihood).full_operator(x, y)
            mm = _median_ms(partial(op.matmul, V), device, repeats=10)
            row.append(f"matmat16[{mode}] {mm:.2f} ms ({mm / base:.1f}x)")
            for stochastic in (False, True):
                iface = TorchGGN(model, p.likelihood, stochastic=stochastic)
                kr = _median_ms(partial(iface.kron, x, y, p.batch_size), device, repeats=10)
                row.append(f"kron{'[mc]' if stochastic else ''}[{mode}] {kr:.2f} ms "
                           f"({kr / base:.1f}x)")
        except Exception as err:  # noqa: BLE001 - a diagnostic run reports and goes on
            row.append(f"{mode}: {type(err).__name__}: {str(err)[:200]}")
        finally:
            products_mod._batch_friendly, kfac_mod._column_block = friendly, column_block
            kfac_mod._fold_columns = fold_columns
            kfac_mod._SAMPLE_BYTES.clear()
    print("\n   ".join(row), flush=True)
    if with_profile:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                         else [])
        for stochastic, mode in ((False, "auto"), (True, "auto")):
            kfac_mod._SAMPLE_BYTES.clear()
            iface = TorchGGN(model, p.likelihood, stochastic=stochastic)
            iface.kron(x, y, p.batch_size)
            with profile(activities=acts) as prof:
                for _ in range(5):
                    iface.kron(x, y, p.batch_size)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            for key in ["cpu_time_total"] + (["self_cuda_time_total"]
                                             if device.type == "cuda" else []):
                print(f"-- {name} kron{'[mc]' if stochastic else ''}[{mode}], 5 calls, by {key}")
                print(prof.key_averages().table(sort_by=key, row_limit=25,
                                                max_name_column_width=70))
            kfac_mod._column_block = column_block


if __name__ == "__main__":
    main()
