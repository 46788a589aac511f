"""Registry of benchmark entries: curvop and its peers, grouped by task.

An :class:`Entry` has a ``setup(problem) -> thunk``: the setup (building interfaces,
operators, probe vectors, BackPACK's ``extend``) is not timed; the returned zero-argument
``thunk`` is what :mod:`benchmarks.measure` times. Each entry belongs to one task (see
:data:`TASKS`); entries of a task compute the same quantity and are compared with each other
and with the curvop entry named in :data:`REFERENCE`.

Libraries are imported inside ``setup``, so a missing library, or a curvop method that does
not exist yet, surfaces as an error string in the results rather than a crash. Entries that
would materialise more than :data:`LIMITS` allows raise :class:`Skipped` before allocating.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.problems import Problem

__all__ = ["COUNTS", "EIG_K", "ENTRIES", "LAPLACE_BATCHES", "LIBRARY_MODULES", "LIMITS",
           "REFERENCE", "TASKS", "Entry", "Skipped", "laplace_loader"]

Thunk = Callable[[], Any]

TASKS: dict[str, str] = {
    "baseline": "one forward + backward pass of the summed loss",
    "diag_ggn": "diagonal of the exact GGN",
    "diag_fisher_mc": "diagonal of the 1-sample Monte-Carlo Fisher",
    "diag_ef": "diagonal of the empirical Fisher",
    "jacobians": "per-sample Jacobians `(B, P, C)` (layout as each library returns)",
    "full_ggn": "dense `P x P` GGN",
    "full_ef": "dense `P x P` empirical Fisher",
    "full_hessian": "dense `P x P` Hessian",
    "operator_build": "build the matrix-free GGN operator (no product)",
    "ggn_product": "GGN times one vector",
    "matmat16": "GGN times a `(P, 16)` matrix",
    "hvp": "Hessian times one vector",
    "ef_product": "empirical Fisher times one vector",
    "fisher_mc_product": "MC Fisher times one vector",
    "kfac_exact": "KFAC with the exact output Hessian (KFLR / type-2)",
    "kfac_mc": "KFAC with 1-sample MC output gradients",
    "eig_top10": "top-10 eigenpairs of the exact GGN of the batch",
    "eig_top10_hessian": "top-10 (largest algebraic) eigenpairs of the Hessian of the batch",
    "laplace_full": "`Laplace(model, lik, subset_of_weights='all', hessian_structure='full', "
                    "backend=B).fit(loader)`, loader of 4 batches",
    "laplace_diag": "the same with `hessian_structure='diag'`",
    "laplace_kron": "the same with `hessian_structure='kron'`",
}
"""Task name -> what every entry of the task computes."""

LIBRARY_MODULES: dict[str, tuple[str, ...]] = {
    "torch": ("torch", "torch.func", "torch._dynamo"),
    "curvop": ("linear_operator", "curvop"),
    "curvlinops": ("curvlinops",),
    "backpack": ("backpack", "einops"),
    "laplace": ("laplace", "laplace.curvature", "asdl"),
}
"""Library -> modules the fork server imports, so that no entry pays (in time or memory) for
importing them; ``torch._dynamo`` is imported lazily by the first ``torch.func`` call and
costs ~170 MB."""

EIG_K = 10
"""Number of eigenpairs of the ``eig_top10*`` tasks."""

LAPLACE_BATCHES = 4
"""Batches in the loader of the ``laplace_*`` tasks."""

COUNTS: dict[str, int] = {}
"""Operator products of the last eigen-solver call (see :func:`_count_curvop`); the eig
entries' thunks carry it as ``thunk.counts`` and :mod:`benchmarks.measure` records it."""

LIMITS: dict[str, float] = {"dense_bytes": 2.0 * 2**30}
"""Largest dense result (bytes) an entry may allocate; bigger ones are skipped."""


class Skipped(Exception):
    """The entry is infeasible on this problem (e.g. a dense `P x P` too large)."""


@dataclass(frozen=True)
class Entry:
    """One timed computation.

    Attributes:
        name: Unique name, ``library.Thing[variant].method``.
        library: ``'torch'``, ``'curvop'``, ``'curvlinops'``, ``'backpack'`` or ``'laplace'``.
        task: A key of :data:`TASKS`.
        setup: ``setup(problem) -> thunk``; untimed preparation returning the timed call.
        note: What the entry does under the hood, where the name does not say it.
    """

    name: str
    library: str
    task: str
    setup: Callable[[Problem], Thunk]
    note: str = ""


ENTRIES: dict[str, Entry] = {}
"""Entry name -> :class:`Entry`, in registration order."""

REFERENCE: dict[str, list[str]] = {}
"""Task -> curvop entries, in order of preference; the first that ran on a problem is the
reference every other entry of that task is compared with (the native ``Torch*`` backend
first, then curvop's BackPACK and ASDL backends where the native one lacks the method)."""


def _register(name: str, task: str, setup: Callable[[Problem], Thunk], note: str = "",
              reference: bool = False) -> None:
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {sorted(TASKS)}; got {task!r}")
    ENTRIES[name] = Entry(name, name.split(".")[0], task, setup, note)
    if reference:
        REFERENCE.setdefault(task, []).append(name)


# --------------------------------------------------------------------------- helpers
def _itemsize(problem: Problem) -> int:
    return next(problem.model.parameters()).element_size()


def _guard(problem: Problem, numel: int, what: str) -> None:
    need = numel * _itemsize(problem)
    if need > LIMITS["dense_bytes"]:
        raise Skipped(
            f"{what} needs {need / 2**30:.1f} GiB > limit "
            f"{LIMITS['dense_bytes'] / 2**30:.1f} GiB (P={problem.num_params})"
        )


def _guard_dense(problem: Problem) -> None:
    _guard(problem, problem.num_params**2, "dense P x P")


def _guard_jacobians(problem: Problem) -> None:
    p = problem
    _guard(p, p.batch_size * p.num_params * p.num_outputs, "Jacobians B x P x C")


def _params(problem: Problem) -> list[torch.Tensor]:
    return [p for p in problem.model.parameters() if p.requires_grad]


def _probe(problem: Problem, ncols: int | None) -> torch.Tensor:
    """Seeded random `(P,)` vector (``ncols=None``) or `(P, ncols)` matrix."""
    gen = torch.Generator().manual_seed(0)
    shape = (problem.num_params,) if ncols is None else (problem.num_params, ncols)
    w = next(problem.model.parameters())
    return torch.randn(shape, generator=gen, dtype=w.dtype).to(w.device)


def _probe_list(problem: Problem) -> list[torch.Tensor]:
    v = _probe(problem, None)
    return [c.view_as(p) for c, p in zip(v.split([p.numel() for p in _params(problem)]),
                                         _params(problem))]


def _mc_kwargs(cls: type, stochastic: bool, device: torch.device) -> dict[str, Any]:
    """Constructor kwargs selecting the MC Fisher, with a seeded generator if accepted.

    The generator lives on the problem's device, as curvlinops' own does: curvop samples on
    the generator's device, and a CPU generator for a CUDA model would time a host
    synchronisation and two transfers per call that a GPU user does not pay.
    """
    if not stochastic:
        return {}
    kwargs: dict[str, Any] = {"stochastic": True}
    if "generator" in inspect.signature(cls).parameters:
        kwargs["generator"] = torch.Generator(device=device).manual_seed(0)
    return kwargs


def _cls(module: str, name: str) -> type:
    """``module.name``; curvop classes are also looked up in curvop's backend registry."""
    mod = importlib.import_module(module)
    if hasattr(mod, name):
        return getattr(mod, name)
    if module == "curvop":
        registry = importlib.import_module("curvop.curvature.registry")
        for classes in getattr(registry, "BACKENDS", {}).values():
            for cls in classes.values():
                if cls.__name__ == name:
                    return cls
    raise AttributeError(f"`{module}` has no `{name}` (not implemented yet?)")


# --------------------------------------------------------------------------- factories
def _baseline(problem: Problem) -> Thunk:
    lossfunc = problem.lossfunc()

    def thunk():
        problem.model.zero_grad(set_to_none=True)
        lossfunc(problem.model(problem.x), problem.y).backward()

    return thunk


def _interface(module: str, cls_name: str, method: str, stochastic: bool = False,
               guard: Callable[[Problem], None] | None = None,
               options: dict[str, Any] | None = None) -> Callable[[Problem], Thunk]:
    """Setup calling ``cls(model, likelihood).method(..., **options)`` (curvop, laplace-torch)."""

    def setup(problem: Problem) -> Thunk:
        if guard is not None:
            guard(problem)
        cls = _cls(module, cls_name)
        if module.startswith("laplace"):  # as `laplace.Laplace(...)` does
            problem.model.output_size = problem.num_outputs
        mc = _mc_kwargs(cls, stochastic, problem.device)
        iface = cls(problem.model, problem.likelihood, **mc)
        fn = getattr(iface, method)
        x, y = problem.x, problem.y
        args = {"jacobians": (x,), "kron": (x, y, problem.batch_size)}.get(method, (x, y))
        kwargs = dict(options or {})
        return lambda: fn(*args, **kwargs)

    return setup


def _curvop_operator(cls_name: str, ncols: int | None = None, stochastic: bool = False,
                     build_only: bool = False) -> Callable[[Problem], Thunk]:
    """Setup for ``op @ v`` with ``op = curvop.<cls>(...).full_operator(x, y)[1]``."""

    def setup(problem: Problem) -> Thunk:
        cls = _cls("curvop", cls_name)
        mc = _mc_kwargs(cls, stochastic, problem.device)
        iface = cls(problem.model, problem.likelihood, **mc)
        if build_only:
            return lambda: iface.full_operator(problem.x, problem.y)
        _, op = iface.full_operator(problem.x, problem.y)
        v = _probe(problem, ncols)
        return lambda: op @ v

    return setup


def _without_cuda_graphs(setup: Callable[[Problem], Thunk]) -> Callable[[Problem], Thunk]:
    """The same entry with every product eager (``curvop.use_cuda_graphs(False)``), on CUDA."""

    def wrapped(problem: Problem) -> Thunk:
        if problem.device.type != "cuda":
            raise Skipped("CUDA graphs exist on CUDA only: the same as the default entry")
        import curvop

        thunk = setup(problem)

        def eager():
            curvop.use_cuda_graphs(False)
            try:
                return thunk()
            finally:
                curvop.use_cuda_graphs(True)

        return eager

    return wrapped


def _curvlinops_operator(cls_name: str, ncols: int | None = None,
                         build_only: bool = False) -> Callable[[Problem], Thunk]:
    """Setup for ``op @ v`` with a curvlinops operator on the single batch."""

    def setup(problem: Problem) -> Thunk:
        cls = _cls("curvlinops", cls_name)

        def build():
            return cls(problem.model, problem.lossfunc(), _params(problem),
                       [(problem.x, problem.y)], check_deterministic=False,
                       num_data=problem.batch_size)

        if build_only:
            return build
        op, v = build(), _probe(problem, ncols)
        return lambda: op @ v

    return setup


def _curvlinops_kfac(fisher_type: str) -> Callable[[Problem], Thunk]:
    """Setup building a curvlinops ``KFACLinearOperator`` and computing its factors."""

    def setup(problem: Problem) -> Thunk:
        cls = _cls("curvlinops", "KFACLinearOperator")

        def thunk():
            op = cls(problem.model, problem.lossfunc(), _params(problem),
                     [(problem.x, problem.y)], check_deterministic=False,
                     fisher_type=fisher_type, num_data=problem.batch_size)
            op.compute_kronecker_factors()
            return op

        return thunk

    return setup


def _backpack_extension(ext_name: str) -> Callable[[Problem], Thunk]:
    """Setup running one backward pass under a BackPACK extension."""

    def setup(problem: Problem) -> Thunk:
        backpack = importlib.import_module("backpack")
        ext = _cls("backpack.extensions", ext_name)
        model = backpack.extend(problem.model)
        lossfunc = backpack.extend(problem.lossfunc())

        def thunk():
            model.zero_grad(set_to_none=True)
            loss = lossfunc(model(problem.x), problem.y)
            with backpack.backpack(ext()):
                loss.backward()
            return [getattr(p, ext().savefield) for p in _params(problem)]

        return thunk

    return setup


def _backpack_ggnvp(problem: Problem) -> Thunk:
    ggn_vector_product = _cls("backpack.hessianfree.ggnvp", "ggn_vector_product")
    lossfunc, v = problem.lossfunc(), _probe_list(problem)

    def thunk():
        out = problem.model(problem.x)
        return ggn_vector_product(lossfunc(out, problem.y), out, problem.model, v)

    return thunk


def _backpack_hvp(problem: Problem) -> Thunk:
    hessian_vector_product = _cls("backpack.hessianfree.hvp", "hessian_vector_product")
    lossfunc, v, params = problem.lossfunc(), _probe_list(problem), _params(problem)

    def thunk():
        loss = lossfunc(problem.model(problem.x), problem.y)
        return hessian_vector_product(loss, params, v)

    return thunk


def _count_curvop() -> dict[str, int]:
    """Count curvop's operator products in :data:`COUNTS` (patches the classes once).

    ``products``: columns multiplied by a data-set operator (GGN- or Hessian-vector products);
    ``jvp_columns`` / ``vjp_columns``: columns of the data-space dual's ``M V`` / ``Mᵀ Y``
    passes; ``gram``: Gram matrices assembled (``eig_lowrank``'s dual route).
    """
    from curvop.linalg.dual import DataSpaceDual
    from curvop.operators.dataset import DatasetLinearOperator

    def wrap(cls: type, name: str, key: str) -> None:
        orig = getattr(cls, name)
        if getattr(orig, "_counted", False):
            return

        def counted(self, *args, **kwargs):
            rhs = args[0] if args else None
            COUNTS[key] = COUNTS.get(key, 0) + (
                1 if rhs is None or rhs.dim() == 1 else int(rhs.shape[-1]))
            return orig(self, *args, **kwargs)

        counted._counted = True
        setattr(cls, name, counted)

    wrap(DatasetLinearOperator, "_matmul", "products")
    wrap(DataSpaceDual, "matvec", "jvp_columns")
    wrap(DataSpaceDual, "rmatvec", "vjp_columns")
    wrap(DataSpaceDual, "_tap_gram", "gram")
    wrap(DataSpaceDual, "_row_gram", "gram")
    return COUNTS


def _curvop_eig(cls_name: str, method: str | None = None) -> Callable[[Problem], Thunk]:
    """Setup for ``cls(..., low_rank=10).eig_lowrank([(x, y)])``.

    With ``method``: ``top_eigenpairs`` of its data-set operator with that route forced.
    """

    def setup(problem: Problem) -> Thunk:
        cls = _cls("curvop", cls_name)
        iface = cls(problem.model, problem.likelihood, low_rank=EIG_K)
        loader = [(problem.x, problem.y)]
        counts = _count_curvop()
        if method is None:
            def thunk():
                return iface.eig_lowrank(loader)
        else:
            from curvop.linalg.eigen import top_eigenpairs

            def thunk():
                return top_eigenpairs(iface.dataset_operator(loader), EIG_K, method=method)

        thunk.counts = counts
        return thunk

    return setup


def _curvlinops_eigsh(cls_name: str) -> Callable[[Problem], Thunk]:
    """Setup for scipy ``eigsh(k=10, which='LA')`` on a curvlinops operator's ``to_scipy()``.

    scipy's defaults otherwise (``tol=0``: machine precision); products counted.
    """

    def setup(problem: Problem) -> Thunk:
        import numpy as np
        import scipy.sparse.linalg as sla

        cls = _cls("curvlinops", cls_name)
        op = cls(problem.model, problem.lossfunc(), _params(problem), [(problem.x, problem.y)],
                 check_deterministic=False, num_data=problem.batch_size).to_scipy()
        counts: dict[str, int] = {}

        def matmat(X):
            X = np.asarray(X)
            counts["products"] = counts.get("products", 0) + (1 if X.ndim == 1 else X.shape[1])
            return op.matmat(X.reshape(X.shape[0], -1)).reshape(X.shape)

        counted = sla.LinearOperator(op.shape, matvec=matmat, matmat=matmat, dtype=op.dtype)
        v0 = np.random.default_rng(0).standard_normal(op.shape[0])

        def thunk():
            return sla.eigsh(counted, k=EIG_K, which="LA", v0=v0)

        thunk.counts = counts
        return thunk

    return setup


def _laplace_eig(problem: Problem) -> Thunk:
    """laplace-torch's own low-rank path (``AsdfghjklHessian.eig_lowrank``)."""
    cls = _cls("laplace.curvature.asdfghjkl", "AsdfghjklHessian")
    problem.model.output_size = problem.num_outputs
    iface = cls(problem.model, problem.likelihood, low_rank=EIG_K)
    loader = [(problem.x, problem.y)]
    return lambda: iface.eig_lowrank(loader)


def laplace_loader(problem: Problem, batches: int = LAPLACE_BATCHES):
    """A ``DataLoader`` (no shuffling) of ``batches`` batches of the problem's batch size.

    The first batch is the problem's own; the others are seeded draws like it: Gaussian
    inputs (integer token inputs: uniform over the ids seen), uniform class labels.
    """
    from torch.utils.data import DataLoader, TensorDataset

    x, y = problem.x, problem.y
    gen = torch.Generator().manual_seed(1234)
    xs, ys = [x.cpu()], [y.cpu()]
    for _ in range(batches - 1):
        if x.is_floating_point():
            xs.append(torch.randn(x.shape, generator=gen, dtype=x.dtype))
        else:
            xs.append(torch.randint(0, int(x.max()) + 1, x.shape, generator=gen, dtype=x.dtype))
        ys.append(torch.randint(0, problem.num_outputs, y.shape, generator=gen, dtype=y.dtype))
    data = TensorDataset(torch.cat(xs).to(x.device), torch.cat(ys).to(y.device))
    return DataLoader(data, batch_size=problem.batch_size, shuffle=False)


def _laplace_fit(module: str, backend: str, structure: str) -> Callable[[Problem], Thunk]:
    """Setup for ``Laplace(model, lik, 'all', structure, backend=...).fit(loader)``.

    The thunk builds the ``Laplace`` object and fits it (all of laplace-torch's overhead);
    a dense `P x P` (``full``) is skipped beyond :data:`LIMITS`.
    """

    def setup(problem: Problem) -> Thunk:
        if structure == "full":
            _guard_dense(problem)
        laplace = importlib.import_module("laplace")
        cls = _cls(module, backend)
        loader = laplace_loader(problem)
        problem.model.output_size = problem.num_outputs

        def thunk():
            la = laplace.Laplace(problem.model, problem.likelihood, subset_of_weights="all",
                                 hessian_structure=structure, backend=cls)
            la.fit(loader)
            return la

        return thunk

    return setup


# --------------------------------------------------------------------------- registry
def _curvop_family(task: str, method: str, classes: tuple[str, ...], stochastic: bool = False,
                   guard: Callable[[Problem], None] | None = None) -> None:
    """Register ``curvop.<cls>.<method>`` for each backend class; all are reference candidates."""
    for cls in classes:
        tag = "[mc]" if stochastic else ""
        _register(f"curvop.{cls}{tag}.{method}", task,
                  _interface("curvop", cls, method, stochastic=stochastic, guard=guard),
                  reference=True)


def _build_registry() -> None:
    r, lp = _register, "laplace.curvature"
    ggn, ef = ("TorchGGN", "BackPackGGN", "AsdlGGN"), ("TorchEF", "BackPackEF", "AsdlEF")
    r("torch.fwd_bwd", "baseline", _baseline, "model.zero_grad; loss(model(x), y).backward()")

    # diagonals
    _curvop_family("diag_ggn", "diag", ggn)
    r("backpack.DiagGGNExact", "diag_ggn", _backpack_extension("DiagGGNExact"))
    r("laplace.CurvlinopsGGN.diag", "diag_ggn",
      _interface(lp, "CurvlinopsGGN", "diag", guard=_guard_jacobians),
      "laplace's default backend; diag via torch.func Jacobians")
    for backend in ("BackPackGGN", "AsdlGGN"):
        r(f"laplace.{backend}.diag", "diag_ggn", _interface(lp, backend, "diag"))

    _curvop_family("diag_fisher_mc", "diag", ggn, stochastic=True)
    r("backpack.DiagGGNMC", "diag_fisher_mc", _backpack_extension("DiagGGNMC"))
    for backend in ("BackPackGGN", "AsdlGGN"):
        r(f"laplace.{backend}[mc].diag", "diag_fisher_mc",
          _interface(lp, backend, "diag", stochastic=True))

    _curvop_family("diag_ef", "diag", ef)
    r("backpack.SumGradSquared", "diag_ef", _backpack_extension("SumGradSquared"))
    r("laplace.CurvlinopsEF.diag", "diag_ef", _interface(lp, "CurvlinopsEF", "diag"),
      "laplace EFInterface.diag via torch.func per-sample gradients")
    for backend in ("BackPackEF", "AsdlEF"):
        r(f"laplace.{backend}.diag", "diag_ef", _interface(lp, backend, "diag"))

    # Jacobians and dense matrices
    _curvop_family("jacobians", "jacobians", ggn, guard=_guard_jacobians)
    for backend in ("CurvlinopsGGN", "BackPackGGN", "AsdlGGN"):
        r(f"laplace.{backend}.jacobians", "jacobians",
          _interface(lp, backend, "jacobians", guard=_guard_jacobians))
    for task, classes, peers in (
        ("full_ggn", ggn, ("CurvlinopsGGN", "BackPackGGN", "AsdlGGN")),
        ("full_ef", ef, ("CurvlinopsEF", "BackPackEF", "AsdlEF")),
        ("full_hessian", ("TorchHessian", "AsdlHessian"), ("CurvlinopsHessian", "AsdlHessian")),
    ):
        _curvop_family(task, "full", classes, guard=_guard_dense)
        for backend in peers:
            r(f"laplace.{backend}.full", task,
              _interface(lp, backend, "full", guard=_guard_dense))

    # matrix-free products
    r("curvop.TorchGGN.full_operator", "operator_build",
      _curvop_operator("TorchGGN", build_only=True), reference=True)
    r("curvlinops.GGNLinearOperator", "operator_build",
      _curvlinops_operator("GGNLinearOperator", build_only=True))
    for task, kind, ncols, peer in (
        ("ggn_product", "GGN", None, "GGNLinearOperator"),
        ("matmat16", "GGN", 16, "GGNLinearOperator"),
        ("hvp", "Hessian", None, "HessianLinearOperator"),
        ("ef_product", "EF", None, "EFLinearOperator"),
    ):
        suffix = "matvec" if ncols is None else f"matmat{ncols}"
        r(f"curvop.Torch{kind}.{suffix}", task, _curvop_operator(f"Torch{kind}", ncols),
          reference=True)
        if kind in ("GGN", "Hessian"):
            r(f"curvop.Torch{kind}.{suffix}[eager]", task,
              _without_cuda_graphs(_curvop_operator(f"Torch{kind}", ncols)),
              "CUDA only: every product eager (curvop.use_cuda_graphs(False)), not replayed "
              "as a CUDA graph")
        r(f"curvlinops.{peer}.{suffix}", task, _curvlinops_operator(peer, ncols))
    r("curvop.TorchGGN[mc].matvec", "fisher_mc_product",
      _curvop_operator("TorchGGN", stochastic=True), reference=True)
    r("curvlinops.FisherMCLinearOperator.matvec", "fisher_mc_product",
      _curvlinops_operator("FisherMCLinearOperator"))
    r("backpack.ggn_vector_product", "ggn_product", _backpack_ggnvp,
      "forward with graph + R-op / Hessian-vector / L-op by double backward")
    r("backpack.hessian_vector_product", "hvp", _backpack_hvp,
      "forward + double backward")

    # Kronecker factors
    _curvop_family("kfac_exact", "kron", ggn)
    r("curvlinops.KFAC[type-2]", "kfac_exact", _curvlinops_kfac("type-2"),
      "construct + compute_kronecker_factors")
    r("backpack.KFLR", "kfac_exact", _backpack_extension("KFLR"))
    _curvop_family("kfac_mc", "kron", ggn, stochastic=True)
    # Layers without a Kronecker form (LayerNorm, Embedding in the transformer problems) make
    # the plain entries raise; these give such tensors their exact diagonal instead.
    for task, stochastic in (("kfac_exact", False), ("kfac_mc", True)):
        tag = "[mc]" if stochastic else ""
        r(f"curvop.TorchGGN{tag}.kron[fallback=diag]", task,
          _interface("curvop", "TorchGGN", "kron", stochastic=stochastic,
                     options={"fallback": "diag"}),
          "kron(x, y, N, fallback='diag'): layers without a Kronecker form get their exact "
          "diagonal", reference=True)
    r("curvlinops.KFAC[mc]", "kfac_mc", _curvlinops_kfac("mc"),
      "construct + compute_kronecker_factors")
    r("backpack.KFAC", "kfac_mc", _backpack_extension("KFAC"))
    for backend in ("CurvlinopsGGN", "BackPackGGN", "AsdlGGN"):
        r(f"laplace.{backend}.kron", "kfac_exact", _interface(lp, backend, "kron"))
        r(f"laplace.{backend}[mc].kron", "kfac_mc",
          _interface(lp, backend, "kron", stochastic=True))

    # top-10 eigenpairs (AsdlGGN has no `low_rank`, so no eig_lowrank)
    r("curvop.TorchGGN.eig_lowrank", "eig_top10", _curvop_eig("TorchGGN"),
      "method='auto': data-space dual where the Gram matrix has a closed form (Linear "
      "networks), ARPACK eigsh otherwise", reference=True)
    r("curvop.TorchGGN.eig_lowrank[lanczos]", "eig_top10", _curvop_eig("TorchGGN", "lanczos"),
      "top_eigenpairs(dataset_operator, 10, method='lanczos'): ARPACK eigsh, tol=1e-8")
    r("curvlinops.GGNLinearOperator.eigsh", "eig_top10", _curvlinops_eigsh("GGNLinearOperator"),
      "scipy eigsh(op.to_scipy(), k=10, which='LA') with scipy's defaults (tol=0)")
    r("curvop.TorchHessian.eig_lowrank", "eig_top10_hessian", _curvop_eig("TorchHessian"),
      "ARPACK eigsh on Hessian-vector products, tol=1e-8", reference=True)
    r("curvop.AsdlHessian.eig_lowrank", "eig_top10_hessian", _curvop_eig("AsdlHessian"),
      "ARPACK eigsh on ASDL's Hessian-vector products, tol=1e-8", reference=True)
    r("curvlinops.HessianLinearOperator.eigsh", "eig_top10_hessian",
      _curvlinops_eigsh("HessianLinearOperator"),
      "scipy eigsh(op.to_scipy(), k=10, which='LA') with scipy's defaults (tol=0)")
    r("laplace.AsdfghjklHessian.eig_lowrank", "eig_top10_hessian", _laplace_eig,
      "laplace-torch's own low-rank path (needs the old asdfghjkl package)")

    # laplace-torch's Laplace(...).fit(loader): curvop's compat backends vs its own
    cl = "curvop.compat.laplace"
    for structure in ("full", "diag", "kron"):
        task = f"laplace_{structure}"
        for backend in ("CurvopGGN", "CurvopBackPackGGN", "CurvopAsdlGGN"):
            r(f"curvop.{backend}[{structure}].fit", task, _laplace_fit(cl, backend, structure),
              reference=True)
        for backend in ("CurvlinopsGGN", "BackPackGGN", "AsdlGGN"):
            note = "laplace-torch's default backend" if backend == "CurvlinopsGGN" else ""
            r(f"laplace.{backend}[{structure}].fit", task, _laplace_fit(lp, backend, structure),
              note)


_build_registry()
