r"""The BackPACK backend: BackPackInterface, BackPackGGN, BackPackEF. BackPACK calls only.

BackPACK (``backpack-for-pytorch``) computes the quantities; this module decides which of its
extensions to run on which modules, and leaves no trace of it on the user's model:

=====================  ===========================================================
method                 BackPACK extension
=====================  ===========================================================
``jacobians``          ``BatchGrad``, one backward pass per output (one forward)
``gradients``          ``BatchGrad`` of the summed loss
GGN ``diag``           ``DiagGGNExact`` (``DiagGGNMC`` with ``stochastic=True``)
GGN ``full``           ``SqrtGGNExact`` / ``SqrtGGNMC``, in chunks of samples
GGN ``kron``           ``KFLR`` / ``KFAC`` into a :class:`curvop.Kron`
EF ``diag``            ``SumGradSquared``
EF ``full``            ``BatchGrad`` per-sample gradients, in chunks of samples
=====================  ===========================================================

``full_operator`` is curvop's shared matrix-free operator (autograd products through the
model; BackPACK has no whole-network curvature-vector products), the same for every backend.
With ``stochastic=True`` its labels are drawn by curvop's sampler from ``generator``, not by
BackPACK, so it matches ``full`` in distribution rather than draw for draw.

**What BackPACK can handle.** First-order extensions (``BatchGrad``, ``SumGradSquared``) work
in any computation graph, as long as every module that owns a selected parameter is a layer
BackPACK knows (``Linear``, ``Conv*``, ``BatchNorm*`` in eval mode, ``Embedding``, ...; exact
types, not subclasses) and is called once per forward. Second-order extensions
(``DiagGGN*``, ``SqrtGGN*``, ``KFLR``/``KFAC``) backpropagate through every layer, so the
model must be a chain: ``nn.Sequential`` containers (nested ones too) of layers BackPACK
knows for that extension. Layers *before* the first one with a selected parameter run
without a graph, so they may be anything (an ``nn.Unflatten``, a frozen LayerNorm encoder,
...). ``kron`` needs whole parameter tensors (``subnetwork_indices`` selecting whole tensors in
order); the EF has no ``kron`` (BackPACK has no Kronecker factors of the empirical Fisher).

Anything else raises :class:`~curvop.errors.NotSupportedError` naming the module and pointing
at :class:`~curvop.curvature.TorchGGN` / :class:`~curvop.curvature.TorchEF`, which work for any
module ``torch.func`` can trace. LayerNorm, attention or custom modules owning selected
parameters, custom containers in a second-order chain, in-place layers in it, and parameters
shared between modules are found by inspection, before any BackPACK work. What inspection
cannot see is caught at run time rather than returned silently wrong: a layer called twice in
one forward (forward hooks count the calls), a parameter also used outside its layer (the
per-sample gradients must add up to autograd's gradient), an in-place operation on a hooked
output, a chain whose sequential run does not reproduce the model's output, and BackPACK's
own ``NotImplementedError`` s.

**Scaling.** BackPACK sees ``lossfunc`` (``MSELoss``/``CrossEntropyLoss`` with
``reduction='sum'``); curvop's loss is ``factor * lossfunc``. Gradients are multiplied by
``factor``, the EF by ``factor**2``, the GGN by ``factor``: BackPACK's ``MSELoss`` Hessian is
``2 I``, so with ``factor = 1/2`` the GGN's Λ is ``I`` as everywhere in curvop.

**Monte Carlo.** ``stochastic=True`` uses BackPACK's own sampling (``mc_samples =
num_samples``), which draws from torch's global random generator. When a ``generator`` is
given, each call draws one seed from it, seeds the global generator of the model's device
with it inside the call and restores the global state afterwards: results are reproducible
from the generator, successive calls differ, and the global RNG is left untouched. BackPACK's
draws are not the ones :class:`~curvop.curvature.TorchGGN` makes with the same generator (both
are unbiased). Without a generator the global RNG is used, and advanced.

**Cleanliness.** Every call extends exactly the modules it needs (``backpack.extend`` on the
layers and on a fresh loss module, never ``self.lossfunc``) and, on exit, failed or not,
removes the hooks it
registered (also from BackPACK's global handle list), the ``_backpack_extend`` flag (BackPACK's
own hook removal leaves it set, after which ``extend`` silently registers nothing), the stored
inputs/outputs and every result field on modules and parameters. Gradients are taken with
``torch.autograd.grad``, so ``.grad`` is never written. Modules the user extended with
BackPACK themselves keep their hooks, and are used as they are. An object can be called any
number of times, in any order. During a backward pass torch's default dtype is the model's
(restored after): BackPACK builds some helper layers in the default dtype, which breaks float64
models otherwise (``AvgPool`` derivatives).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from curvop._functional import Batch
from curvop.curvature.interface import CurvatureInterface, EFInterface, GGNInterface
from curvop.errors import InputTypeError, NotSupportedError
from curvop.feature_extractor import FeatureExtractor
from curvop.operators.kron import Kron

try:  # optional dependency: the classes raise on first use when it is missing
    import backpack as _bp
    from backpack.context import CTX as _CTX
    from backpack.extensions import (
        KFAC,
        KFLR,
        BatchGrad,
        DiagGGNExact,
        DiagGGNMC,
        SqrtGGNExact,
        SqrtGGNMC,
        SumGradSquared,
    )
except ImportError as _err:  # pragma: no cover - exercised only without BackPACK
    _bp = None
    _IMPORT_ERROR: ImportError | None = _err
else:
    _IMPORT_ERROR = None

__all__ = ["BackPackInterface", "BackPackGGN", "BackPackEF"]

_ALTERNATIVE = "TorchGGN / TorchEF (torch.func; any module it can trace)"
_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module"
_MISSING = object()


def _require_backpack(cls: str) -> None:
    if _bp is None:
        raise ImportError(
            f"{cls} needs BackPACK: pip install 'curvop[backpack]' (backpack-for-pytorch)"
        ) from _IMPORT_ERROR


# --- which modules BackPACK must extend ------------------------------------------------------


def _known_modules(ext) -> set[type] | None:
    """The module classes ``ext`` has an extension for (``None`` if BackPACK hides them)."""
    mapping = getattr(ext, "_BackpropExtension__module_extensions", None)
    return None if mapping is None else set(mapping)


def _describe(name: str, module: nn.Module) -> str:
    return f"module {name!r} ({type(module).__name__})" if name else \
        f"the module itself ({type(module).__name__})"


def _unsupported(what: str, name: str, module: nn.Module, ext, reason: str = "") -> None:
    why = reason or (f"BackPACK's {type(ext).__name__} has no extension for it (BackPACK matches "
                     "exact layer types)")
    raise NotSupportedError(f"{what} cannot handle {_describe(name, module)}: {why}; "
                            f"use {_ALTERNATIVE}")


def _owners(root: nn.Module, params: Sequence[Tensor], names: Sequence[str], what: str
            ) -> list[tuple[str, nn.Module]]:
    """The modules that directly own the selected parameters, each once, in order.

    Raises:
        NotSupportedError: If a selected parameter is registered in two different modules.
    """
    found: dict[int, list[tuple[str, nn.Module]]] = {id(p): [] for p in params}
    for mname, m in root.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None and id(p) in found and all(m is not o for _, o in found[id(p)]):
                found[id(p)].append((mname, m))
    owners: dict[int, tuple[str, nn.Module]] = {}
    for p, pname in zip(params, names):
        mods = found[id(p)]
        if len(mods) > 1:
            raise NotSupportedError(
                f"{what} cannot handle parameter {pname!r}: it is shared by "
                f"{[n for n, _ in mods]}, and BackPACK computes per-module quantities; "
                f"use {_ALTERNATIVE}")
        owners.setdefault(id(mods[0][1]), mods[0])
    return list(owners.values())


def _flatten_chain(module: nn.Module, name: str = "") -> list[tuple[str, nn.Module]]:
    """The layers of ``module`` in call order, seeing through plain Sequential containers."""
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        out = []
        for child_name, child in module._modules.items():
            if child is not None:
                out += _flatten_chain(child, f"{name}.{child_name}" if name else child_name)
        return out
    if isinstance(module, FeatureExtractor) and type(module).forward is FeatureExtractor.forward:
        return _flatten_chain(module.model, f"{name}.model" if name else "model")
    return [(name, module)]


class _Chain:
    """A model as a chain of layers: a prefix run without graph, then the extended suffix.

    Args:
        root: The module (``batch.fm.module``).
        params: The selected (live) parameters.
        ext: The second-order extension, to check the suffix's layer types against.
        what: ``"BackPackGGN.diag (DiagGGNExact)"`` style, for messages.

    Raises:
        NotSupportedError: If the model is not a chain of layers ``ext`` knows from its first
            layer with a selected parameter on.
    """

    def __init__(self, root: nn.Module, params: Sequence[Tensor], ext, what: str) -> None:
        layers = _flatten_chain(root)
        live = {id(p) for p in params}
        owns = [any(p is not None and id(p) in live for p in m._parameters.values())
                for _, m in layers]
        if not any(owns):  # the selected parameters live inside a layer we cannot see through
            name, m = next((n, m) for n, m in layers
                           if any(id(p) in live for p in m.parameters()))
            _unsupported(what, name, m, ext, "it is a custom module whose forward BackPACK "
                         "cannot follow (second-order extensions need nn.Sequential chains of "
                         "layers)")
        start = owns.index(True)
        self.prefix = [m for _, m in layers[:start]]
        suffix = layers[start:]
        known = _known_modules(ext)
        seen: set[int] = set()
        for name, m in suffix:
            if id(m) in seen:
                _unsupported(what, name, m, ext, "it is called more than once in the chain")
            seen.add(id(m))
            if known is not None and type(m) not in known:
                reason = ""
                if m._modules:
                    reason = ("it is a custom module whose forward BackPACK cannot follow "
                              "(second-order extensions need nn.Sequential chains of layers)")
                _unsupported(what, name, m, ext, reason)
            if getattr(m, "inplace", False):
                _unsupported(what, name, m, ext,
                             "it works in place, which BackPACK's hooks forbid (inplace=False)")
        self.suffix = [m for _, m in suffix]

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            for m in self.prefix:
                x = m(x)
        for m in self.suffix:
            x = m(x)
        return x


def _check_first_order(root: nn.Module, batch: Batch, ext, what: str
                       ) -> list[tuple[str, nn.Module]]:
    """The owners of the selected parameters, each a layer ``ext`` knows.

    Raises:
        NotSupportedError: Naming the first owner BackPACK has no extension for.
    """
    owners = _owners(root, batch.sel.params, batch.sel.names, what)
    known = _known_modules(ext)
    for name, m in owners:
        if known is not None and type(m) not in known:
            _unsupported(what, name, m, ext)
    return owners


# --- one BackPACK session on the user's modules ----------------------------------------------


def _has_backpack_hooks(m: nn.Module) -> bool:
    return (_bp.hook_store_io in m._forward_hooks.values()
            and _bp.hook_run_extensions in m._backward_hooks.values())


def _restore_dict(obj: object, saved: dict) -> None:
    current = vars(obj)
    for k in [k for k in current if k not in saved]:
        del current[k]
    for k, v in saved.items():
        if current.get(k, _MISSING) is not v:
            current[k] = v


class _Session:
    """Extend ``modules`` with BackPACK for one computation; undo everything on exit.

    Restores each module's and parameter's ``__dict__`` (BackPACK's stored inputs/outputs,
    result fields and the ``_backpack_extend`` flag), removes the hooks registered here (also
    from BackPACK's global handle list) and the ``.grad`` of the parameters. Counts the forward
    calls of the named layers in ``counted``: a layer called twice makes BackPACK silently wrong.
    """

    def __init__(self, modules: Sequence[nn.Module],
                 counted: Sequence[tuple[str, nn.Module]] = ()) -> None:
        self.modules = list({id(m): m for m in modules}.values())
        self.counted = list(counted)
        self.calls: dict[int, int] = {}

    def __enter__(self) -> _Session:
        self.saved = [(m, dict(vars(m))) for m in self.modules]
        params = list({id(p): p for m in self.modules for p in m.parameters()}.values())
        self.saved += [(p, dict(vars(p))) for p in params]
        self.grads = [(p, p.grad) for p in params]
        self.handles = []
        try:
            for m in self.modules:
                self._extend(m)
            for _, m in self.counted:
                self.handles.append(m.register_forward_hook(self._count))
        except BaseException:
            self._restore()
            raise
        return self

    def _count(self, module: nn.Module, *args) -> None:
        self.calls[id(module)] = self.calls.get(id(module), 0) + 1

    def _extend(self, m: nn.Module) -> None:
        if _has_backpack_hooks(m):  # extended by the user: use their hooks, add none
            return
        # a stale flag (left by BackPACK's hook removal) would make extend() register nothing
        vars(m).pop("_backpack_extend", None)
        before = {id(h) for h in _CTX.hook_handles}
        try:
            _bp.extend(m)
        finally:
            self.handles += [h for h in _CTX.hook_handles if id(h) not in before]
            _CTX.hook_handles = [h for h in _CTX.hook_handles if id(h) in before]

    def check_single_calls(self, what: str) -> None:
        """Raise if a counted layer ran more than once since the last check; reset the counts."""
        calls, self.calls = self.calls, {}
        for name, m in self.counted:
            if calls.get(id(m), 0) > 1:
                _unsupported(what, name, m, None, f"it is called {calls[id(m)]} times in one "
                             "forward pass and BackPACK keeps only the last input")

    def _restore(self) -> None:
        for h in self.handles:
            h.remove()
        for obj, saved in self.saved:
            _restore_dict(obj, saved)
        for p, g in self.grads:
            if p.grad is not g:
                p.grad = g

    def __exit__(self, *exc) -> None:
        self._restore()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make ``dtype`` torch's default inside (restored after).

    BackPACK builds some helper layers in the default dtype (e.g. the transposed convolution
    of its ``AvgPool`` derivatives), which fails for float64 models otherwise.
    """
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
    except (TypeError, ValueError):  # a dtype torch refuses as default: leave it
        pass
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def _active(ext, dtype: torch.dtype, retain_graph: bool = False) -> Iterator[None]:
    """``backpack(ext)`` for a backward pass, in the model's default dtype."""
    with warnings.catch_warnings(), _default_dtype(dtype):
        warnings.filterwarnings("ignore", message=_HOOK_WARNING)
        with _bp.backpack(ext, retain_graph=retain_graph):
            yield


@contextlib.contextmanager
def _translated(what: str, model: nn.Module | None = None) -> Iterator[None]:
    """BackPACK's own errors (and hook conflicts) as NotSupportedError naming ``what``.

    A hook conflict (torch's "Output 0 of BackwardHookFunction is a view and is being modified
    inplace") is an in-place operation on the output of a module BackPACK hooks; the message
    names ``model``'s modules that work in place (``inplace=True``), the usual culprits.
    """
    try:
        yield
    except NotSupportedError:
        raise
    except NotImplementedError as err:
        raise NotSupportedError(f"{what}: BackPACK cannot compute this: {err}; "
                                f"use {_ALTERNATIVE}") from err
    except RuntimeError as err:
        if "BackwardHookFunction" not in str(err):
            raise
        names = [] if model is None else [
            name or type(m).__name__ for name, m in model.named_modules()
            if getattr(m, "inplace", False) is True]
        culprit = (f"modules working in place: {names} (set inplace=False)" if names else
                   "an in-place tensor operation in forward, such as `out += identity`")
        raise NotSupportedError(
            f"{what}: an in-place operation conflicts with BackPACK's hooks, which forbid "
            f"modifying a hooked module's output in place. Likely culprit: {culprit}. Make it "
            f"out of place or use {_ALTERNATIVE}. (torch: {str(err).split('. ')[0]})") from err


@contextlib.contextmanager
def _seeded(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Drive the global RNG of ``device`` from ``generator`` inside, restore it after."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) \
        if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _take(p: Tensor, field: str, grad: Tensor | None, name: str, what: str) -> Tensor | None:
    """Take BackPACK's result ``field`` off parameter ``p``; ``None`` if ``p`` is unused.

    Raises:
        NotSupportedError: If ``p`` influences the loss but BackPACK computed nothing for it.
    """
    value = vars(p).pop(field, None)
    if value is None and grad is not None:
        raise NotSupportedError(f"{what}: BackPACK computed no `{field}` for parameter {name!r} "
                                f"(its module's hooks did not run); use {_ALTERNATIVE}")
    return value


def _or_zeros(values: Sequence[Tensor | None], shapes: Sequence[Sequence[int]], like: Tensor
              ) -> list[Tensor]:
    return [like.new_zeros(s) if v is None else v for v, s in zip(values, shapes)]


def _check_sum(per_sample: Tensor, total: Tensor, name: str, what: str) -> None:
    """Raise unless per-sample gradients `(B, n)` add up to the gradient `(n,)`.

    If they do not, BackPACK missed a use of the parameter outside its module. Checked on a
    strided subset of at most ~512 entries, which keeps it cheap.
    """
    step = max(1, total.numel() // 512)
    per_sample, total = per_sample[:, ::step], total[::step]
    scale = per_sample.abs().sum(0).norm() + torch.finfo(total.dtype).tiny
    if (per_sample.sum(0) - total).norm() > 10 * math.sqrt(torch.finfo(total.dtype).eps) * scale:
        raise NotSupportedError(
            f"{what}: BackPACK's per-sample gradients of parameter {name!r} do not add up to its "
            "gradient: the parameter is used outside its module's forward (weight tying, a "
            f"functional call); use {_ALTERNATIVE}")


# --- the interfaces -----------------------------------------------------------------------


class BackPackInterface(CurvatureInterface):
    """Jacobians and per-sample gradients with BackPACK's ``BatchGrad``.

    Takes the arguments of :class:`~curvop.curvature.CurvatureInterface`. See the module
    docstring for what BackPACK can handle, the scaling and the cleanup.

    Raises:
        ImportError: If BackPACK is not installed.
    """

    supports: ClassVar[frozenset[str]] = frozenset({"_jacobians", "_gradients"})
    alternative: ClassVar[str] = _ALTERNATIVE

    def __init__(self, *args, **kwargs) -> None:
        _require_backpack(type(self).__name__)
        super().__init__(*args, **kwargs)

    def _what(self, method: str, ext) -> str:
        return f"{type(self).__name__}.{method} ({type(ext).__name__})"

    def _lossfunc(self) -> nn.Module:
        """A fresh summed loss module, so that ``self.lossfunc`` is never extended."""
        return self._likelihood.lossfunc()

    def _first_order(self, batch: Batch, method: str, ext) -> tuple[str, _Session]:
        """Check the owners of the selected parameters; a session that extends them."""
        what = self._what(method, ext)
        owners = _check_first_order(batch.fm.module, batch, ext, what)
        return what, _Session([m for _, m in owners], counted=owners)

    def _per_sample(self, batch: Batch, loss: Tensor, ext, what: str, retain_graph: bool = False
                    ) -> list[Tensor]:
        """Backpropagate ``loss`` with ``ext`` (``BatchGrad``): per-parameter `(B, *shape)`."""
        live, names, B = batch.sel.params, batch.sel.names, batch.size
        with _active(ext, batch.f.dtype, retain_graph=retain_graph):
            grads = torch.autograd.grad(loss, live, retain_graph=retain_graph, allow_unused=True)
        out = []
        for p, g, name in zip(live, grads, names):
            gb = _take(p, ext.savefield, g, name, what)
            if gb is None:
                gb = p.new_zeros(B, *p.shape)
            elif g is not None:
                _check_sum(gb.reshape(B, -1), g.flatten(), name, what)
            out.append(gb.detach())
        return out

    def _jacobians(self, batch: Batch) -> Tensor:
        what, session = self._first_order(batch, "jacobians", BatchGrad())
        B, C = batch.f.shape
        J = batch.f.new_empty(C, B, batch.sel.num_params)
        with session, _translated(what, batch.fm.module):
            with torch.enable_grad():
                out = batch.fm.module(batch.x.detach())
            session.check_single_calls(what)
            for c in range(C):  # one forward, one backward per output
                Jc = self._per_sample(batch, out[:, c].sum(), BatchGrad(), what,
                                      retain_graph=c < C - 1)
                J[c] = batch.flat(Jc, 1)
        return J.transpose(0, 1)

    def _gradients(self, batch: Batch) -> Tensor:
        ext = BatchGrad()
        what, session = self._first_order(batch, "gradients", ext)
        with session, _translated(what, batch.fm.module):
            with torch.enable_grad():
                loss = self._lossfunc()(batch.fm.module(batch.x.detach()), batch.y)
            session.check_single_calls(what)
            G = self._per_sample(batch, loss, ext, what)
        return batch.flat(G, 1) * self.factor

    def _second_order(self, batch: Batch, method: str, make_ext: Callable[[], object],
                      bytes_per_sample: int, consume: Callable[[slice, list], None],
                      generator: torch.Generator | None = None) -> None:
        """Run ``make_ext()`` over chunks of samples; ``consume(rows, fields)`` each result.

        ``fields`` are BackPACK's per-parameter results (``None`` for parameters that do not
        influence the loss), consumed while the session is open so that nothing outlives it.

        Raises:
            NotSupportedError: Before any work, if the model is not a chain BackPACK knows.
        """
        probe = make_ext()
        what = self._what(method, probe)
        chain = _Chain(batch.fm.module, batch.sel.params, probe, what)
        lossfunc = self._lossfunc()
        live, names = batch.sel.params, batch.sel.names
        atol = 1e-5 * (1 + float(batch.f.abs().max()))
        with _Session([*chain.suffix, lossfunc]), _seeded(generator, batch.f.device), \
                _translated(what, batch.fm.module):
            for rows in batch.sample_chunks(bytes_per_sample):
                ext = make_ext()
                with torch.enable_grad():
                    out = chain(batch.x[rows].detach())
                    loss = lossfunc(out, batch.y[rows])
                if not torch.allclose(out.detach(), batch.f[rows], rtol=1e-4, atol=atol):
                    raise NotSupportedError(
                        f"{what}: running the layers of the model in sequence does not reproduce"
                        " its output (a Sequential with a custom forward, or randomness such as "
                        f"Dropout in training mode: call model.eval()); use {_ALTERNATIVE}")
                with _active(ext, batch.f.dtype):
                    grads = torch.autograd.grad(loss, live, allow_unused=True)
                consume(rows, [_take(p, ext.savefield, g, name, what)
                               for p, g, name in zip(live, grads, names)])


class BackPackGGN(BackPackInterface, GGNInterface):
    r"""The GGN (or, with ``stochastic=True``, the MC Fisher) with BackPACK.

    Args:
        model, likelihood, last_layer, subnetwork_indices, stochastic, num_samples, generator:
            See :class:`~curvop.curvature.GGNInterface`. With ``stochastic=True`` BackPACK
            samples (``mc_samples = num_samples``), seeded from ``generator`` (see the module
            docstring).
        **kwargs: ``memory_budget`` and ``max_bytes``.

    ``kron(x, y, N)`` follows laplace-torch 0.3's BackPACK backend: BackPACK's KFLR (KFAC for
    ``stochastic=True``) factors of a ``Linear``/``Conv`` weight are ``[G, A]`` with
    :math:`G = \sum_n S_n S_n^\top` (output side, summed over the batch of size ``M``) and
    :math:`A = \frac1M \sum_n a_n a_n^\top` (input side, averaged); a bias has ``[G]``. The
    returned blocks are ``factor * G ⊗ (M / N) A`` and ``factor * G``: for ``M == N`` the usual
    KFAC approximation of the batch's GGN (exact for one datum), and for mini-batches of a data
    set of size ``N`` the terms whose factor-wise sum over the batches (``Kron.accumulate``) is
    the KFAC of the whole set. (laplace-torch spreads ``factor`` as ``factor ** (1/2)`` over both
    factors; the blocks are the same.)

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                           torch.nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> loss, h = BackPackGGN(net, 'classification').diag(x, y)
        >>> from curvop.curvature import TorchGGN
        >>> torch.allclose(h, TorchGGN(net, 'classification').diag(x, y)[1])
        True
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"_jacobians", "_gradients", "_full", "_diag", "_kron", "_full_operator"})

    def __init__(self, model: nn.Module, likelihood: str, last_layer: bool = False,
                 subnetwork_indices: Tensor | None = None, stochastic: bool = False,
                 num_samples: int = 1, generator: torch.Generator | None = None,
                 **kwargs) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, stochastic,
                         num_samples, generator, **kwargs)

    def _columns(self, batch: Batch) -> int:
        """``K``: columns of the loss-Hessian square root BackPACK backpropagates."""
        return self.num_samples if self.stochastic else batch.f.shape[1]

    def _diag(self, batch: Batch) -> Tensor:
        if self.stochastic:
            def make():
                return DiagGGNMC(mc_samples=self.num_samples)
        else:
            make = DiagGGNExact
        h = batch.f.new_zeros(batch.sel.num_live)

        def add(rows: slice, fields: list) -> None:
            h.add_(batch.sel.flatten(_or_zeros(fields, batch.sel.shapes, h)))

        # per sample, BackPACK holds K backpropagated columns of at most a layer's size
        per_sample = 2 * self._columns(batch) * max(batch.sel.numels) * batch.itemsize
        self._second_order(batch, "diag", make, per_sample, add, self._generator())
        return batch.sel.select(h) * self.factor

    def _full(self, batch: Batch) -> Tensor:
        if self.stochastic:
            def make():
                return SqrtGGNMC(mc_samples=self.num_samples)
        else:
            make = SqrtGGNExact
        K, P = self._columns(batch), batch.sel.num_params
        H = batch.f.new_zeros(P, P)

        def add(rows: slice, fields: list) -> None:
            shapes = [(K, rows.stop - rows.start, *s) for s in batch.sel.shapes]
            V = batch.flat(_or_zeros(fields, shapes, H), 2).reshape(-1, P)  # (K n, P)
            H.addmm_(V.T, V)

        per_sample = 3 * K * batch.sel.num_live * batch.itemsize
        self._second_order(batch, "full", make, per_sample, add, self._generator())
        return H * self.factor

    def _kron(self, batch: Batch, N: int, **kwargs) -> Kron:
        if kwargs:
            raise InputTypeError(
                f"{type(self).__name__}.kron got unexpected keyword arguments {sorted(kwargs)}")
        if batch.sel.index is not None:
            raise NotSupportedError(
                f"{type(self).__name__}.kron: Kronecker blocks exist for whole parameter tensors "
                "only; `subnetwork_indices` must select whole tensors, in order (or use `full` / "
                "`diag` on the subnetwork)")
        if self.stochastic:
            def make():
                return KFAC(mc_samples=self.num_samples)
        else:
            make = KFLR
        # per block: the output-side G summed over the batch, the input side Σ a aᵀ (BackPACK
        # returns the batch mean, so chunks add up exactly when weighted by their size)
        sums: list[list[Tensor] | None] = [None] * len(batch.sel.params)

        def add(rows: slice, fields: list) -> None:
            n = rows.stop - rows.start
            for i, factors in enumerate(fields):
                if factors is None:
                    continue
                factors = [factors[0], *(n * F for F in factors[1:])]
                sums[i] = factors if sums[i] is None else [
                    S + F for S, F in zip(sums[i], factors)]

        per_sample = 2 * self._columns(batch) * max(batch.sel.numels) * batch.itemsize
        self._second_order(batch, "kron", make, per_sample, add, self._generator())
        kfacs = []
        for S, p in zip(sums, batch.sel.params):
            if S is None:  # the parameter does not influence the loss: a zero block
                S = [p.new_zeros(p.shape[0], p.shape[0]),
                     p.new_zeros(p[0].numel(), p[0].numel())] if p.dim() > 1 else \
                    [p.new_zeros(p.numel(), p.numel())]
            block = [self.factor * S[0], *(F / N for F in S[1:])]
            kfacs.append([(F + F.mT).detach() / 2 for F in block])  # exactly symmetric
        return Kron(kfacs)

    def _generator(self) -> torch.Generator | None:
        return self.generator if self.stochastic else None


class BackPackEF(BackPackInterface, EFInterface):
    r"""The empirical Fisher :math:`\sum_n g_n g_n^\top` with BackPACK.

    ``diag`` runs ``SumGradSquared``; ``full`` assembles ``BatchGrad`` per-sample gradients in
    chunks of samples. ``kron`` is not available: BackPACK has no Kronecker factors of the
    empirical Fisher.

    Args:
        model, likelihood, last_layer, subnetwork_indices: See
            :class:`~curvop.curvature.CurvatureInterface`.
        **kwargs: ``memory_budget`` and ``max_bytes``.
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"_jacobians", "_gradients", "_full", "_diag", "_full_operator"})
    alternative: ClassVar[str] = (
        "BackPackGGN (BackPACK has Kronecker factors of the GGN / MC Fisher only, none of the "
        f"empirical Fisher) or {_ALTERNATIVE}")

    def __init__(self, model: nn.Module, likelihood: str, last_layer: bool = False,
                 subnetwork_indices: Tensor | None = None, **kwargs) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, **kwargs)

    def _diag(self, batch: Batch) -> Tensor:
        ext = SumGradSquared()
        what, session = self._first_order(batch, "diag", ext)
        live, names = batch.sel.params, batch.sel.names
        h = batch.f.new_zeros(batch.sel.num_live)
        with session, _translated(what, batch.fm.module):
            for rows in batch.sample_chunks(2 * max(batch.sel.numels) * batch.itemsize):
                ext = SumGradSquared()
                with torch.enable_grad():
                    loss = self._lossfunc()(batch.fm.module(batch.x[rows].detach()),
                                            batch.y[rows])
                session.check_single_calls(what)
                with _active(ext, batch.f.dtype):
                    grads = torch.autograd.grad(loss, live, allow_unused=True)
                fields = [_take(p, ext.savefield, g, name, what)
                          for p, g, name in zip(live, grads, names)]
                h += batch.sel.flatten(_or_zeros(fields, batch.sel.shapes, h)).detach()
        return batch.sel.select(h) * self.factor**2
