r"""The ASDL backend: AsdlGGN, AsdlEF, AsdlHessian (PyPI ``asdfghjkl``, imported as ``asdl``).

ASDL calls only; what is computed (the loss, Λ, the parameter selection) is curvop's.

How ASDL is driven, and how its conventions map onto curvop's (SPEC §3):

- **Per-sample Jacobians and gradients** come from ASDL's ``batch_grads`` operation (module
  hooks that form per-sample gradients from a layer's inputs and output gradients): one forward,
  then one backward per output (Jacobians) or one backward of the summed loss (gradients).
- **GGN / MC Fisher / EF** (``full``, ``diag``, ``kron``) come from ASDL's Fisher makers
  (``fisher_exact``, ``fisher_mc``, ``fisher_emp``). ASDL's exact Fisher of its ``mse`` loss is
  :math:`\sum_n J_n^\top J_n` and of ``cross_entropy`` is :math:`\sum_n J_n^\top(\mathrm{diag}(p)
  - pp^\top)J_n`: exactly curvop's GGN of ``0.5 * MSE`` and of the summed cross-entropy. The
  empirical Fisher is given curvop's own loss (``factor`` included), so it needs no rescaling.
  ASDL's Monte-Carlo Fisher divides each sampled loss by ``n_mc_samples`` *before* squaring its
  gradients, so its result is ``1 / num_samples`` of the average of ``g gᵀ``; it is multiplied
  back by ``num_samples``.
- **Sampling** (``stochastic=True``): ASDL draws its labels from torch's *global* RNG and takes
  no generator. With a ``generator``, each call draws one seed from it, seeds the global RNG of
  the model's device with it inside :func:`torch.random.fork_rng` and restores the global RNG
  state on exit: results are reproducible from the generator and the user's global RNG stream is
  left untouched. Without a generator, ASDL simply consumes the global RNG.
- **Hessian** (``AsdlHessian``): ASDL's ``HessianMaker`` differentiates the loss twice with
  autograd, so ``full`` works for any module; ``diag`` takes module-wise blocks and needs every
  selected parameter to be the ``weight`` or ``bias`` of a module.
- **Kron** (KFAC, laplace-torch's scaling): a weight block is ``[B, A / N]`` with ``B`` the
  summed output-gradient factor `(out, out)` and ``A`` the summed input factor `(in, in)`
  (Conv2d: ASDL's ``A`` averages over output locations); a bias block is ``[B]``. With one datum
  and ``N = 1`` this is the exact block diagonal of an MLP's GGN / EF.
- **Parameter selection**: parameters outside the selection are frozen for the duration of a
  call, so ASDL computes only the selected tensors (with ``last_layer`` the module is the last
  layer and its inputs are the features); entries are then picked with the selection's index.

ASDL supports ``Linear``, ``Conv2d`` (no groups, no dilation, zero padding), ``BatchNorm1d/2d``
and ``LayerNorm`` (affine, non-zero weights: ASDL recovers the normalised input by dividing by
the weight; no Kronecker form). Anything else that owns a selected parameter — a parameter used
directly in ``forward``, other layer types, tied weights, a layer called twice, a layer applied
over extra (sequence) dimensions — raises :class:`~curvop.errors.NotSupportedError` naming the
module, before ASDL computes anything, instead of silently missing or mixing parameters.

**In-place operations.** ASDL keeps (detached views of) a layer's input and, for BatchNorm and
LayerNorm, its output (it recovers the normalised input from it) and reads them back in
backward. An in-place change later in forward — torchvision's ``BasicBlock`` does
``out = bn2(...); out += identity`` — would silently corrupt ASDL's BatchNorm results (5-20% off
on small ResNets). So the output of a selected norm layer is handed on to the network as a copy
while ASDL keeps the original; an in-place change of a saved Linear / Conv2d input (which
autograd would reject as well) raises :class:`~curvop.errors.NotSupportedError` naming the
layer at the end of the forward pass, before ASDL's backward work.

ASDL stores results as attributes of modules and parameters and registers hooks: every call runs
in a guard that removes all of them (and restores ``requires_grad``, ``.grad`` and torch's
backward-hook mode flag) when it ends, failed or not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from curvop import _checks
from curvop._functional import Batch
from curvop._model_guard import ModelSnapshot
from curvop.curvature.interface import (
    CurvatureInterface,
    EFInterface,
    GGNInterface,
    HessianOperatorMixin,
)
from curvop.errors import InputTypeError, NotSupportedError
from curvop.likelihoods import Likelihood

__all__ = ["AsdlInterface", "AsdlGGN", "AsdlEF", "AsdlHessian"]

# attribute names ASDL stores its results under: private, so no attribute of the user's is touched
_FISHER_ATTR = "_curvop_asdl_fisher"
_HESSIAN_ATTR = "_curvop_asdl_hessian"


def _asdl():
    """Import ASDL, or raise an ImportError that names the extra to install."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script deprecation
            import asdl
    except ImportError as err:
        raise ImportError(
            "the ASDL backend needs the `asdfghjkl` package: pip install 'curvop[asdl]'"
        ) from err
    return asdl


# --- which layers ASDL handles, and how ------------------------------------------------


def _conv_problem(m: nn.Conv2d) -> str | None:
    if m.groups != 1:
        return f"groups={m.groups} (ASDL's im2col assumes groups=1)"
    if tuple(m.dilation) != (1, 1):
        return f"dilation={m.dilation} (ASDL's im2col assumes no dilation)"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r} (ASDL's im2col pads with zeros)"
    if isinstance(m.padding, str) and m.padding != "valid":
        return f"padding={m.padding!r} (ASDL's im2col needs numeric padding)"
    return None


def _norm_problem(m: nn.Module) -> str | None:
    if m.weight is None or m.bias is None:
        return "no affine weight and bias (ASDL recovers the normalised input from them)"
    if not bool((m.weight != 0).all()):
        return ("zero entries in its weight (ASDL recovers the normalised input by dividing "
                "the output by the weight)")
    return None


@dataclasses.dataclass(frozen=True)
class _Layer:
    """What ASDL does for one layer type."""

    kron: bool
    #: input dimensions per sample-batch for per-sample results (None: normalized_shape + 1)
    in_ndim: int | None
    problem: Callable[[nn.Module], str | None] = lambda m: None


#: layer type → handling, resolved along ``type(module).__mro__`` (subclasses work)
_LAYERS: dict[type, _Layer] = {
    nn.Linear: _Layer(kron=True, in_ndim=2),
    nn.Conv2d: _Layer(kron=True, in_ndim=4, problem=_conv_problem),
    nn.BatchNorm1d: _Layer(kron=False, in_ndim=2, problem=_norm_problem),
    nn.BatchNorm2d: _Layer(kron=False, in_ndim=4, problem=_norm_problem),
    nn.LayerNorm: _Layer(kron=False, in_ndim=None, problem=_norm_problem),
}


def _layer(module: nn.Module) -> _Layer | None:
    for cls in type(module).__mro__:
        if cls in _LAYERS:
            return _LAYERS[cls]
    return None


@dataclasses.dataclass
class _Slot:
    """One live parameter: where it lives and where it goes in the live vector."""

    name: str  # module name, relative to the computed module
    module: nn.Module
    attr: str  # 'weight' or 'bias'
    param: Tensor
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.param.numel()


def _where(name: str) -> str:
    return f"module {name!r}" if name else "the model itself"


def _slots(module: nn.Module, batch: Batch, need: str) -> list[_Slot]:
    """Map every live parameter to its owning layer and check ASDL can compute ``need`` there.

    ``need`` is ``'grads'`` (per-sample gradients, diagonal, full), ``'kron'``, ``'hessian'``
    (module-wise Hessian blocks: the weight or bias of any module) or ``'any'`` (autograd only).

    Raises:
        NotSupportedError: Naming the first module or parameter ASDL cannot handle.
    """
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, m in module.named_modules():
        for attr, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mname, m, attr))
    slots, start = [], 0
    for pname, p in zip(batch.sel.names, batch.sel.params):
        found = owners[id(p)]
        if len(found) > 1 and need != "any":
            raise NotSupportedError(
                f"parameter {pname!r} is shared by {[n for n, _, _ in found]}: ASDL would count "
                f"it once per module; use {_ALTERNATIVE}")
        mname, m, attr = found[0]
        kind = type(m).__name__
        if need == "any":
            slots.append(_Slot(mname, m, attr, p, start))
            start += p.numel()
            continue
        if attr not in ("weight", "bias"):
            raise NotSupportedError(
                f"ASDL cannot compute the curvature of parameter {pname!r}: it is not the weight "
                f"or bias of a layer but {attr!r} of {_where(mname)} ({kind}), which ASDL "
                f"does not support; use {_ALTERNATIVE}")
        if need != "hessian":
            layer = _layer(m)
            if layer is None:
                raise NotSupportedError(
                    f"ASDL does not support {_where(mname)} ({kind}), which owns parameter "
                    f"{pname!r}; it supports Linear, Conv2d, BatchNorm1d/2d and LayerNorm. "
                    f"Use {_ALTERNATIVE}")
            problem = layer.problem(m)
            if problem is not None:
                raise NotSupportedError(
                    f"ASDL does not support {_where(mname)} ({kind}) with {problem}; "
                    f"use {_ALTERNATIVE}")
            if need == "kron" and not layer.kron:
                raise NotSupportedError(
                    f"{_where(mname)} ({kind}) has no Kronecker-factored form in ASDL; use diag "
                    "or full")
        slots.append(_Slot(mname, m, attr, p, start))
        start += p.numel()
    return slots


# --- the guard around every ASDL call --------------------------------------------------


@contextlib.contextmanager
def _asdl_call(module: nn.Module, slots: list[_Slot], batch_size: int | None,
               reads_back: bool = True) -> Iterator[None]:
    """Run ASDL on ``module`` with only the live parameters trainable; leave it as found.

    Removes every hook and attribute ASDL adds (also on failure), restores ``requires_grad``,
    ``.grad``, parameter attributes and torch's per-module backward-hook mode flag (which ASDL's
    ``register_backward_hook`` sets and which would later forbid full backward hooks).

    With ``batch_size``, probe hooks check that every live layer is called once, on inputs with
    the batch as first and only extra dimension, and keep what ASDL reads back in backward
    safe from in-place changes (see :func:`_probe`; ``reads_back=False`` for ``kron``, whose
    input factor is formed in forward); otherwise ASDL's per-sample results would be wrong, so
    the probe raises :class:`NotSupportedError` in the forward pass, before ASDL's backward work.
    """
    snap = ModelSnapshot(module)
    flags = [(m, vars(m).get("_is_full_backward_hook")) for m in snap.modules]
    param_dicts = [(p, dict(vars(p))) for p in snap.params]
    live = {id(s.param) for s in slots}
    handles = []
    try:
        for p in snap.params:
            p.grad = None
            if id(p) not in live:
                p.requires_grad_(False)
        if batch_size is not None:
            handles = _probe(module, slots, batch_size, reads_back)
        with warnings.catch_warnings(), torch.enable_grad():
            # ASDL registers old-style module backward hooks; torch deprecates them
            warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
            yield
    finally:
        for h in handles:
            h.remove()
        snap.restore()
        for m, flag in flags:
            if "_is_full_backward_hook" in vars(m):
                m._is_full_backward_hook = flag
        for p, before in param_dicts:
            for k, v in before.items():
                if k not in vars(p) or vars(p)[k] is not v:
                    setattr(p, k, v)


#: layers whose normalised input ASDL recovers in backward from their saved *output*
_FROM_OUTPUT = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


def _probe(module: nn.Module, slots: list[_Slot], batch_size: int, reads_back: bool) -> list:
    """Hooks that check what ASDL's per-sample operations assume; returns their handles.

    - every live layer is called once, on inputs with the batch as first and only extra
      dimension;
    - what ASDL saves in forward and reads back in backward is not changed in place later in the
      forward pass. ASDL keeps (detached views of) a layer's input and, for BatchNorm and
      LayerNorm, its output, from which it recovers the normalised input. A residual
      ``out += identity`` after a BatchNorm (torchvision's ``BasicBlock``) would silently corrupt
      the saved output. So the output of a live norm layer is handed on as a copy, by a hook run
      after ASDL's (added from a pre-hook, when ASDL's hooks are in place): ASDL keeps the
      original, the network goes on with the copy. With ``reads_back`` (every operation but
      ``kron``, whose input factor is formed in forward), an in-place change of a saved Linear
      or Conv2d input is detected when ``module``'s forward ends and raises
      :class:`NotSupportedError` naming the layer, before ASDL's backward work.
    """
    calls: dict[int, int] = {}
    saved: list[tuple[_Slot, Tensor, int]] = []
    handles: list = []

    def hand_on_a_copy(m, inputs, output):
        return output.clone()

    for s in {id(s.module): s for s in slots}.values():
        layer = _layer(s.module)
        ndim = (len(s.module.normalized_shape) + 1 if isinstance(s.module, nn.LayerNorm)
                else layer.in_ndim)
        from_output = isinstance(s.module, _FROM_OUTPUT)

        def hook(m, inputs, output, s=s, ndim=ndim, from_output=from_output):
            calls[id(m)] = calls.get(id(m), 0) + 1
            if calls[id(m)] > 1:
                raise NotSupportedError(
                    f"{_where(s.name)} ({type(m).__name__}) is called more than once in forward; "
                    f"ASDL keeps only the last call's inputs. Use {_ALTERNATIVE}")
            x = inputs[0]
            if x.dim() != ndim or x.shape[0] != batch_size:
                raise NotSupportedError(
                    f"{_where(s.name)} ({type(m).__name__}) receives inputs of shape "
                    f"{tuple(x.shape)}; ASDL's per-sample results need ({batch_size}, ...) with "
                    f"{ndim} dimensions (no extra shared dimensions). Use {_ALTERNATIVE}")
            kept = output if from_output else x
            saved.append((s, kept, kept._version))

        handles.append(s.module.register_forward_hook(hook))
        if from_output:
            def pre_hook(m, inputs):
                # registered now, this hook runs after ASDL's forward hook
                handles.append(m.register_forward_hook(hand_on_a_copy))

            handles.append(s.module.register_forward_pre_hook(pre_hook))

    def check(m, inputs, output):
        for s, kept, version in saved:
            if reads_back and kept._version != version:
                raise NotSupportedError(
                    f"the input of {_where(s.name)} ({type(s.module).__name__}) is modified in "
                    "place later in the forward pass; ASDL reads it back in backward, so its "
                    "per-sample results would be wrong. Make that operation out of place or "
                    f"use {_ALTERNATIVE}")
        saved.clear()

    handles.append(module.register_forward_hook(check))
    return handles


@contextlib.contextmanager
def _global_rng_from(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Seed the global RNG of ``device`` from ``generator`` inside, restore it outside."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(cuda[0]):
                torch.cuda.manual_seed(seed)
        yield


# --- assembling ASDL's per-module results into curvop's layout ---------------------------


def _live_vector(batch: Batch, slots: list[_Slot], part: Callable[[_Slot], Tensor | None],
                 lead: tuple[int, ...] = ()) -> Tensor:
    """Concatenate per-parameter results `(*lead, *shape)` (None: zero) into `(*lead, P_live)`."""
    out = batch.f.new_zeros(*lead, batch.sel.num_live)
    for s in slots:
        value = part(s)
        if value is not None:
            out[..., s.start:s.stop] = value.reshape(*lead, -1).to(out.dtype)
    return out


def _stats(module: nn.Module, attr: str, *keys: str) -> Tensor | None:
    value = getattr(module, attr, None)
    for key in keys:
        value = getattr(value, key, None)
    return value


class AsdlInterface(CurvatureInterface):
    """Shared ASDL machinery: per-sample Jacobians and gradients, and the Fisher makers.

    See the module docstring for how ASDL is driven and what it supports.

    Raises:
        ImportError: If ASDL (``asdfghjkl``) is not installed.
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"_jacobians", "_gradients", "_full", "_diag", "_kron", "_full_operator"})
    alternative = "TorchGGN / TorchEF / TorchHessian"

    def __init__(self, *args, **kwargs) -> None:
        _asdl()
        super().__init__(*args, **kwargs)

    # --- per-sample gradients --------------------------------------------------------

    def _per_sample(self, batch: Batch, scalars: Callable[[Tensor], list[Tensor]]) -> Tensor:
        """Per-sample gradients of each scalar of ``scalars(f)``, `(K, B, P)` (selected)."""
        from asdl.operations import OP_BATCH_GRADS

        module = batch.fm.module
        slots = _slots(module, batch, "grads")
        params = [s.param for s in slots]
        with _asdl_call(module, slots, batch.size), _asdl().extend(module, OP_BATCH_GRADS) as cxt:
            outs = scalars(module(batch.x))
            rows = []
            for k, out in enumerate(outs):
                cxt.clear_batch_grads()
                torch.autograd.grad(out, params, retain_graph=k < len(outs) - 1,
                                    allow_unused=True)
                rows.append(_live_vector(
                    batch, slots, lambda s: (cxt.batch_grads(s.module) or {}).get(s.attr),
                    (batch.size,)))
        return batch.sel.select(torch.stack(rows))

    def _jacobians(self, batch: Batch) -> Tensor:
        J = self._per_sample(batch, lambda f: [f[:, c].sum() for c in range(f.shape[1])])
        return J.transpose(0, 1)

    def _gradients(self, batch: Batch) -> Tensor:
        return self._per_sample(batch, lambda f: [batch.likelihood.loss(f, batch.y)])[0]

    # --- Fisher makers -----------------------------------------------------------------

    @property
    def _fisher_type(self) -> str:
        raise NotImplementedError

    @property
    def _mc_scale(self) -> float:
        """Factor that undoes ASDL's ``1 / n_mc_samples`` shrinkage (1 when exact)."""
        return 1.0

    def _fisher(self, batch: Batch, shapes: list[str], need: str):
        """Set up ASDL's Fisher maker for the batch.

        Returns ``(root, slots, maker, guard)``: ``maker.forward_and_backward()`` must run inside
        ``guard``, and results be read there (from ``root`` and the slots' modules).
        """
        from asdl.fisher import FisherConfig, get_fisher_maker
        from asdl.grad_maker import LOSS_CROSS_ENTROPY, LOSS_MSE
        from asdl.matrices import FISHER_EMP

        module = batch.fm.module
        slots = _slots(module, batch, need)
        # a container root: ASDL stores the full matrix on the root and a layer's own results
        # on the layer; with a bare layer as root one would overwrite the other
        root = nn.Sequential(module)
        likelihood = batch.likelihood
        config = FisherConfig(
            fisher_type=self._fisher_type,
            loss_type=LOSS_CROSS_ENTROPY if likelihood is Likelihood.CLASSIFICATION
            else LOSS_MSE,
            fisher_shapes=shapes,
            n_mc_samples=getattr(self, "num_samples", 1),
            data_size=1,
            fisher_attr=_FISHER_ATTR,
            fvp_attr=_FISHER_ATTR + "_fvp",
        )
        maker = get_fisher_maker(root, config)
        dummy = maker.setup_model_call(root, batch.x)
        if self._fisher_type == FISHER_EMP:
            def loss(f: Tensor, y: Tensor, reduction: str = "sum") -> Tensor:
                return likelihood.loss(f, y)  # curvop's loss: ASDL needs a `reduction` argument

            maker.setup_loss_call(loss, dummy, batch.y)
        generator = getattr(self, "generator", None) if getattr(self, "stochastic", False) \
            else None
        ctx = contextlib.ExitStack()
        ctx.enter_context(_asdl_call(module, slots, batch.size, reads_back=need != "kron"))
        ctx.enter_context(_global_rng_from(generator, batch.f.device))
        return root, slots, maker, ctx

    def _full(self, batch: Batch) -> Tensor:
        from asdl.matrices import SHAPE_DIAG, SHAPE_FULL

        root, slots, maker, ctx = self._fisher(batch, [SHAPE_FULL, SHAPE_DIAG], "grads")
        with ctx:
            maker.forward_and_backward()
            H = _stats(root, _FISHER_ATTR, "data")
            # ASDL's order: modules in `modules()` order that produced results, weight then bias
            order = [s for m in root.modules() if _stats(m, _FISHER_ATTR, "diag") is not None
                     for attr in ("weight", "bias") for s in slots
                     if s.module is m and s.attr == attr]
        P = batch.sel.num_live
        out = batch.f.new_zeros(P, P)
        if order:
            idx = torch.cat([torch.arange(s.start, s.stop) for s in order]).to(out.device)
            if H is None or H.shape[0] != idx.numel():
                raise RuntimeError(
                    f"ASDL returned a full matrix of unexpected shape "
                    f"{None if H is None else tuple(H.shape)} for {idx.numel()} parameters")
            out[idx.unsqueeze(1), idx] = H.to(out.dtype) * self._mc_scale
        return batch.sel.select(batch.sel.select(out, 0), 1)

    def _diag(self, batch: Batch) -> Tensor:
        from asdl.matrices import SHAPE_DIAG

        root, slots, maker, ctx = self._fisher(batch, [SHAPE_DIAG], "grads")
        with ctx:
            maker.forward_and_backward()
            h = _live_vector(batch, slots, lambda s: _stats(s.module, _FISHER_ATTR, "diag",
                                                             s.attr))
        return batch.sel.select(h) * self._mc_scale

    def _kron(self, batch: Batch, N: int, **kwargs) -> object:
        from asdl.matrices import SHAPE_KRON

        from curvop.operators.kron import Kron

        if kwargs:
            raise InputTypeError(f"{type(self).__name__}.kron takes no options; got "
                                 f"{sorted(kwargs)}")
        if batch.sel.index is not None:
            raise NotSupportedError(
                "kron needs whole parameter tensors in parameter order; `subnetwork_indices` "
                "selects entries inside them. Use diag or full with a subnetwork")
        root, slots, maker, ctx = self._fisher(batch, [SHAPE_KRON], "kron")
        kfacs = []
        with ctx:
            maker.forward_and_backward()
            for s in slots:
                A = _stats(s.module, _FISHER_ATTR, "kron", "A")  # input side
                B = _stats(s.module, _FISHER_ATTR, "kron", "B")  # output side
                out_dim = s.param.shape[0]
                if B is None:  # the layer did not influence the output
                    B = batch.f.new_zeros(out_dim, out_dim)
                B = B.detach().clone() * self._mc_scale
                if s.attr == "bias":
                    kfacs.append([B])
                    continue
                in_dim = s.param.numel() // out_dim
                A = batch.f.new_zeros(in_dim, in_dim) if A is None else A.detach().clone()
                kfacs.append([B, A / N])
        return Kron(kfacs)


_ALTERNATIVE = AsdlInterface.alternative


class AsdlGGN(AsdlInterface, GGNInterface):
    """GGN (or MC Fisher with ``stochastic=True``) with ASDL.

    Args:
        model, likelihood, last_layer, subnetwork_indices, stochastic, num_samples, generator:
            See :class:`~curvop.curvature.GGNInterface`; the sampling is ASDL's, driven by
            ``generator`` through a seeded, restored global RNG (module docstring).
        **kwargs: ``memory_budget`` and ``max_bytes``.

    Raises:
        ImportError: If ASDL is not installed.
        NotSupportedError: From a method, if a selected parameter lives in a module ASDL does
            not support.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                           torch.nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> loss, H = AsdlGGN(net, 'classification').full(x, y)
        >>> tuple(H.shape), bool(torch.allclose(H, H.T))
        ((26, 26), True)
    """

    @property
    def _fisher_type(self) -> str:
        from asdl.matrices import FISHER_EXACT, FISHER_MC

        return FISHER_MC if self.stochastic else FISHER_EXACT

    @property
    def _mc_scale(self) -> float:
        return float(self.num_samples) if self.stochastic else 1.0


class AsdlEF(AsdlInterface, EFInterface):
    """Empirical Fisher with ASDL: ``AsdlEF(model, likelihood, last_layer=False)``.

    ``subnetwork_indices`` is accepted as well (fourth argument, as on every interface).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
        >>> ef = AsdlEF(net, 'regression')
        >>> torch.allclose(ef.diag(x, y)[1], ef.gradients(x, y)[1].square().sum(0))
        True
    """

    @property
    def _fisher_type(self) -> str:
        from asdl.matrices import FISHER_EMP

        return FISHER_EMP


class AsdlHessian(HessianOperatorMixin, AsdlInterface):
    """The Hessian of the loss with ASDL's ``HessianMaker``.

    Args:
        model, likelihood, last_layer: See :class:`~curvop.curvature.CurvatureInterface`.
        low_rank: Number of eigenpairs ``eig_lowrank`` returns.
        subnetwork_indices: Keyword only; see :class:`~curvop.curvature.CurvatureInterface`.
        **kwargs: ``memory_budget`` and ``max_bytes``.

    ``full`` works for any model (ASDL differentiates twice with autograd); ``diag`` needs every
    selected parameter to be a module's ``weight`` or ``bias``. ASDL has no Kronecker-factored
    Hessian.

    Raises:
        InputError, InputTypeError: If an argument is malformed (see
            :class:`~curvop.curvature.CurvatureInterface`), or ``low_rank`` is not a positive
            int.
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"_jacobians", "_gradients", "_full", "_diag", "_full_operator"})
    alternative = "TorchHessian"

    def __init__(self, model: nn.Module, likelihood: str, last_layer: bool = False,
                 low_rank: int = 10, *, subnetwork_indices: Tensor | None = None,
                 **kwargs) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, **kwargs)
        self.low_rank = _checks.check_positive_int(low_rank, "low_rank")

    def _hessian(self, batch: Batch, shape: str, need: str):
        """Set up ASDL's Hessian maker; returns ``(module, slots it computes, maker)``.

        Parameters the loss does not depend on are left out (ASDL's autograd calls would fail
        on them); their rows and columns are zero.
        """
        from asdl.hessian import HessianConfig, HessianMaker

        module = batch.fm.module
        slots = _slots(module, batch, need)
        with _asdl_call(module, slots, None):
            grads = torch.autograd.grad(batch.likelihood.loss(module(batch.x), batch.y),
                                        [s.param for s in slots], allow_unused=True)
        slots = [s for s, g in zip(slots, grads) if g is not None]
        config = HessianConfig(
            hessian_attr=_HESSIAN_ATTR, tmp_hessian_attr=_HESSIAN_ATTR + "_tmp",
            hvp_attr=_HESSIAN_ATTR + "_hvp", tmp_hvp_attr=_HESSIAN_ATTR + "_tmp_hvp",
            hessian_shapes=[shape])
        maker = HessianMaker(module, config)
        dummy = maker.setup_model_call(module, batch.x)
        maker.setup_loss_call(batch.likelihood.loss, dummy, batch.y)
        return module, slots, maker

    def _full(self, batch: Batch) -> Tensor:
        from asdl.matrices import SHAPE_FULL

        module, slots, maker = self._hessian(batch, SHAPE_FULL, "any")
        P = batch.sel.num_live
        out = batch.f.new_zeros(P, P)
        if slots:
            with _asdl_call(module, slots, None):
                maker.forward_and_backward()
                H = _stats(module, _HESSIAN_ATTR, "data")
            idx = torch.cat([torch.arange(s.start, s.stop) for s in slots]).to(out.device)
            out[idx.unsqueeze(1), idx] = H.to(out.dtype)
        return batch.sel.select(batch.sel.select(out, 0), 1)

    def _diag(self, batch: Batch) -> Tensor:
        from asdl.matrices import SHAPE_DIAG

        module, slots, maker = self._hessian(batch, SHAPE_DIAG, "hessian")
        if not slots:
            return batch.f.new_zeros(batch.sel.num_params)
        with _asdl_call(module, slots, None):
            maker.forward_and_backward()
            h = _live_vector(batch, slots, lambda s: _stats(s.module, _HESSIAN_ATTR, "diag",
                                                             s.attr))
        return batch.sel.select(h)
