r"""laplace-torch backends computed by curvop: ``Laplace(model, ..., backend=CurvopGGN)``.

Every class of curvop's backend registry (:data:`curvop.curvature.registry.BACKENDS`) gets a
laplace-torch backend here (laplace-torch 0.3 and 0.5), named ``"Curvop" +`` the curvop class
name without ``Torch``: ``CurvopGGN``, ``CurvopEF``, ``CurvopHessian`` (the native torch.func
backend), ``CurvopBackPackGGN``, ``CurvopBackPackEF``, ``CurvopAsdlGGN``, ``CurvopAsdlEF``,
``CurvopAsdlHessian``. They subclass laplace-torch's ``GGNInterface`` / ``EFInterface`` /
``CurvatureInterface`` (``SubnetLaplace`` insists on the first two), so an existing workflow
switches to curvop with one argument::

    la = laplace.Laplace(model, 'classification', subset_of_weights='all',
                         hessian_structure='kron', backend=CurvopGGN)

The curvature itself is curvop's (:attr:`CurvopBackend.curvature` is the curvop interface, with
its matrix-free operators); the classes translate only what laplace-torch does differently:

- ``jacobians`` / ``last_layer_jacobians``: ``Js`` `(B, C, P)` (curvop: `(B, P, C)`).
- ``gradients``: ``(Gs, loss)`` of ``lossfunc`` *without* ``factor`` (curvop: ``(loss, Gs)``
  of ``factor * lossfunc``), so both are curvop's divided by ``factor``.
- ``full`` / ``diag`` / ``kron`` / ``eig_lowrank`` return ``factor * lossfunc`` as the loss
  (curvop's loss). The GGN and the Hessian are curvop's. laplace-torch 0.3's empirical Fisher
  is ``factor * Σ ∇ℓ ∇ℓᵀ`` with ``ℓ = lossfunc``, i.e. curvop's EF divided by ``factor`` (twice
  curvop's for regression); laplace-torch 0.5's is ``factor ** 2 * Σ ∇ℓ ∇ℓᵀ``, curvop's. The
  installed version's convention is read from its ``EFInterface`` (:data:`FACTOR_POWER`).
- ``kron`` returns laplace-torch's own ``laplace.utils.matrix.Kron`` (``KronLaplace`` adds it
  to its ``Kron`` factor-wise). The blocks are curvop's (input side already divided by the
  data-set size ``N``, so that factor-wise sums over batches are the data-set KFAC), with
  laplace-torch's split of the scale over the two factors: its Curvlinops and BackPACK
  backends compute factors of ``lossfunc`` and multiply the ``Kron`` by their curvature
  factor ``c`` (``factor``; ``factor ** 2`` for the EF of 0.5), which ``Kron.__mul__`` spreads
  as ``c ** (1/2)`` per factor. So ``[A, B]`` becomes ``[A · s / √c, B · √c]`` and a dense
  ``[C]`` becomes ``[C · s]``, ``s`` the scale above (1, or ``1 / factor`` for the EF of 0.3).
  Only ``KronLaplace(damping=True)`` sees the split.
  (laplace-torch's ASDL GGN backend splits regression factors differently, ``[A, B]``.)
- A laplace-torch ``FeatureExtractor`` (what ``LLLaplace`` passes, with ``last_layer=True``)
  becomes a :class:`curvop.FeatureExtractor` of the same network and last layer.
- ``subnetwork_indices`` assigned after construction (``SubnetLaplace`` does this) is
  validated like the constructor argument.

:class:`LowRankLaplace` is laplace-torch's ``LowRankLaplace`` without its requirement of the old
``asdfghjkl`` package (which PyPI no longer ships): it fits through ``eig_lowrank`` of
``CurvopHessian`` (default), ``CurvopGGN`` or ``CurvopAsdlHessian``. :func:`Laplace` is
``laplace.Laplace`` with curvop backends as defaults and with that ``'lowrank'`` structure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvop import _checks
from curvop.curvature.interface import CurvatureInterface
from curvop.curvature.registry import BACKENDS
from curvop.errors import InputError, InputTypeError, NotSupportedError
from curvop.feature_extractor import FeatureExtractor
from curvop.operators.kron import Kron
from curvop.params import trainable_named_parameters

try:
    import laplace as _laplace
    from laplace.baselaplace import ParametricLaplace as _ParametricLaplace
    from laplace.curvature.curvature import CurvatureInterface as LaplaceCurvatureInterface
    from laplace.curvature.curvature import EFInterface as LaplaceEFInterface
    from laplace.curvature.curvature import GGNInterface as LaplaceGGNInterface
    from laplace.utils.feature_extractor import FeatureExtractor as LaplaceFeatureExtractor
    from laplace.utils.matrix import Kron as LaplaceKron
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "curvop.compat.laplace needs laplace-torch; install it with "
        "`pip install 'curvop[laplace]'`") from err

#: curvop kind → the laplace-torch interface its backends subclass
LAPLACE_BASES: dict[str, type] = {
    "ggn": LaplaceGGNInterface,
    "ef": LaplaceEFInterface,
    "hessian": LaplaceCurvatureInterface,
}


def _laplace_ef_power() -> int:
    """The power of ``factor`` in the installed laplace-torch's empirical Fisher.

    laplace-torch 0.3 scales ``Σ ∇ℓ ∇ℓᵀ`` (``ℓ`` from ``lossfunc``) by ``factor``; 0.5 by
    ``factor ** 2`` (its ``EFInterface._curvature_factor``), which is curvop's EF. Read from
    laplace-torch's own definition, evaluated at ``factor = 1/2``.
    """
    prop = getattr(LaplaceEFInterface, "_curvature_factor", None)
    if not isinstance(prop, property):
        return 1
    return round(math.log(prop.fget(SimpleNamespace(factor=0.5)), 0.5))


#: curvop kind → power of ``factor`` in curvop's curvature of ``factor * lossfunc``, relative
#: to the curvature of ``lossfunc`` (the EF is quadratic in the loss)
CURVOP_POWER: dict[str, int] = {"ggn": 1, "ef": 2, "hessian": 1}
#: curvop kind → the same power in the installed laplace-torch (its ``_curvature_factor``)
LAPLACE_POWER: dict[str, int] = {"ggn": 1, "ef": _laplace_ef_power(), "hessian": 1}
#: curvop kind → power of ``factor`` that turns curvop's curvature into laplace-torch's
FACTOR_POWER: dict[str, int] = {k: LAPLACE_POWER[k] - CURVOP_POWER[k] for k in CURVOP_POWER}


def _delegated(name: str) -> property:
    """A read-only attribute of the wrapped curvop interface."""

    def get(self: CurvopBackend) -> Any:
        try:
            return getattr(self.curvature, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no `{name}`") from None

    return property(get, doc=f"``{name}`` of :attr:`CurvopBackend.curvature`.")


def _curvop_model(model: nn.Module) -> nn.Module:
    """laplace-torch's ``FeatureExtractor`` → curvop's, on the same network and last layer.

    Raises:
        InputError: If the last layer of the laplace-torch extractor is not known yet.
        NotSupportedError: If it reduces features (``feature_reduction``).
    """
    if not isinstance(model, LaplaceFeatureExtractor):
        return model
    if model.last_layer is None:
        raise InputError(
            "`model` is a laplace-torch FeatureExtractor whose last layer is not known yet; "
            "give it `last_layer_name` or call its `find_last_layer(x)` first (as laplace's "
            "LLLaplace.fit does)")
    if model.feature_reduction is not None:
        raise NotSupportedError(
            "`model` reduces its last-layer features (`feature_reduction="
            f"{model.feature_reduction!r}`), which curvop's FeatureExtractor does not do; "
            "reduce the features inside the model instead")
    return FeatureExtractor(model.model, last_layer_name=model._last_layer_name)


def _no_backprop(enable_backprop: bool, method: str) -> None:
    if enable_backprop:
        raise NotSupportedError(
            f"`{method}(..., enable_backprop=True)`: curvop's Jacobians are detached; use "
            "laplace-torch's own backend (e.g. CurvlinopsGGN) for a predictive differentiable "
            "in the inputs")


def _no_options(kwargs: dict[str, Any], method: str) -> None:
    """laplace-torch passes ``N`` to ``full``/``diag``; anything else would be dropped silently."""
    extra = sorted(k for k in kwargs if k != "N")
    if extra:
        raise InputTypeError(f"`{method}` takes no options but laplace-torch's `N`; got {extra}")


def to_laplace_kron(K: Kron, factor: float, scale: float = 1.0,
                    params: Iterable[Tensor] | None = None) -> LaplaceKron:
    """A :class:`curvop.Kron` as laplace-torch's ``Kron``, with laplace-torch's factor split.

    Args:
        K: Blocks ``[A, B]`` (``A ⊗ B``) or ``[C]``, in parameter order.
        factor: What laplace-torch multiplies its ``Kron`` of ``lossfunc`` by (its
            ``_curvature_factor``: the likelihood's ``factor``, 0.5 for regression and 1 for
            classification; for the EF of laplace-torch 0.5, ``factor ** 2``).
        scale: What curvop's curvature is multiplied by (``1 / factor`` for the EF of
            laplace-torch 0.3; see :data:`FACTOR_POWER`).
        params: If given, the parameters whose ``Kron.init_from_model`` layout the blocks
            must match (``KronLaplace`` adds the result to that layout factor by factor).

    Returns:
        ``laplace.utils.matrix.Kron`` with blocks ``[A · scale / √factor, B · √factor]`` and
        ``[C · scale]`` (new tensors).

    Raises:
        NotSupportedError: If the blocks do not match the layout of ``params`` (e.g. a grouped
            convolution, which curvop splits into one block per group).
    """
    root = math.sqrt(factor)
    kfacs = [[blk[0] * (scale / root), blk[1] * root] if len(blk) == 2 else [blk[0] * scale]
             for blk in K.kfacs]
    if params is not None:
        params = list(params)
        ref = LaplaceKron.init_from_model(params, params[0].device, params[0].dtype)
        want = [[tuple(F.shape) for F in blk] for blk in ref.kfacs]
        got = [[tuple(F.shape) for F in blk] for blk in kfacs]
        if want != got:
            raise NotSupportedError(
                "laplace-torch's Kron needs one block per parameter tensor, [out x out, "
                f"in x in] for a weight and [n x n] for a bias: {want}; curvop's kron gave "
                f"{got}. Use hessian_structure='diag' or 'full' for this model")
    return LaplaceKron(kfacs)


class CurvopBackend(LaplaceCurvatureInterface):
    """A laplace-torch curvature backend that computes with a curvop interface.

    Subclasses (generated from curvop's registry) set :attr:`curvop_class` and :attr:`kind`.
    laplace-torch constructs them as ``backend(model, likelihood, last_layer=...,
    dict_key_x=..., dict_key_y=..., **backend_kwargs)``.

    Args:
        model: The network, or laplace-torch's ``FeatureExtractor`` (last-layer Laplace).
        likelihood: ``'classification'`` or ``'regression'`` (str or laplace's enum).
        last_layer: Only the last layer's parameters.
        subnetwork_indices: Indices into the trainable parameter vector.
        dict_key_x, dict_key_y: Accepted for laplace-torch; curvop takes tensor inputs only.
        **kwargs: Options of the curvop class (``stochastic``, ``num_samples``,
            ``generator``, ``low_rank``, ``memory_budget``, ...).

    Attributes:
        curvature: The curvop interface (for its operators, e.g. ``full_operator``; their
            scaling is curvop's).
        model: The model as laplace-torch passed it.

    Raises:
        InputError, InputTypeError: From curvop's validation of the arguments;
            InputTypeError also when this base class is instantiated itself.
        NotSupportedError: For a laplace-torch ``FeatureExtractor`` with feature reduction.
    """

    curvop_class: ClassVar[type[CurvatureInterface]]
    kind: ClassVar[str]

    def __init__(self, model: nn.Module, likelihood: str, last_layer: bool = False,
                 subnetwork_indices: Tensor | None = None, dict_key_x: str = "input_ids",
                 dict_key_y: str = "labels", **kwargs: Any) -> None:
        if not hasattr(type(self), "curvop_class"):
            raise InputTypeError("CurvopBackend is the base class; pass a generated backend "
                                 f"such as CurvopGGN: {sorted(_NAMES)}")
        # laplace-torch's __init__ is not called: curvop validates the arguments and owns them
        self.model = model
        self.dict_key_x, self.dict_key_y = dict_key_x, dict_key_y
        self.curvature = self.curvop_class(
            _curvop_model(model), getattr(likelihood, "value", likelihood),
            last_layer=last_layer, subnetwork_indices=subnetwork_indices, **kwargs)

    likelihood = _delegated("likelihood")
    last_layer = _delegated("last_layer")
    lossfunc = _delegated("lossfunc")
    factor = _delegated("factor")
    stochastic = _delegated("stochastic")
    num_samples = _delegated("num_samples")
    low_rank = _delegated("low_rank")

    @property
    def subnetwork_indices(self) -> Tensor | None:
        """Indices into the trainable parameter vector; assignable (``SubnetLaplace`` does)."""
        return self.curvature.subnetwork_indices

    @subnetwork_indices.setter
    def subnetwork_indices(self, indices: Tensor | None) -> None:
        total = sum(p.numel() for p in self.params)
        self.curvature.subnetwork_indices = _checks.check_subnetwork_indices(indices, total)

    @property
    def _model(self) -> nn.Module:
        cv = self.curvature
        return cv.model.last_layer if cv.last_layer else cv.model

    @property
    def params(self) -> list[nn.Parameter]:
        """Trainable parameters of the model (of its last layer with ``last_layer``)."""
        return [p for _, p in trainable_named_parameters(self._model)]

    @property
    def params_dict(self) -> dict[str, nn.Parameter]:
        """``params`` by name, as laplace-torch's base methods expect."""
        return dict(trainable_named_parameters(self._model))

    @property
    def buffers_dict(self) -> dict[str, Tensor]:
        """The model's buffers by name, as laplace-torch's base methods expect."""
        return dict(self.model.named_buffers())

    @property
    def _scale(self) -> float:
        return self.factor ** FACTOR_POWER[self.kind]

    @property
    def _curvature_factor(self) -> float:
        """What laplace-torch multiplies the curvature of ``lossfunc`` by.

        ``factor``; for the EF ``factor`` in laplace-torch 0.3 and ``factor ** 2`` in 0.5.
        """
        return self.factor ** LAPLACE_POWER[self.kind]

    def jacobians(self, x: Tensor, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians in laplace-torch's layout.

        Args:
            x: Inputs `(B, ...)`.
            enable_backprop: Must be False: curvop's Jacobians are detached.

        Returns:
            ``(Js, f)``: ``Js`` `(B, C, P)`, ``f`` `(B, C)`.

        Raises:
            NotSupportedError: For ``enable_backprop=True``.
        """
        _no_backprop(enable_backprop, "jacobians")
        Js, f = self.curvature.jacobians(x)
        return Js.transpose(1, 2), f

    functorch_jacobians = jacobians  # laplace-torch's predictive calls it for "asdl" names

    def last_layer_jacobians(self, x: Tensor, enable_backprop: bool = False
                             ) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians in the last layer's parameters, in laplace-torch's layout.

        Args:
            x: Inputs `(B, ...)`.
            enable_backprop: Must be False: curvop's Jacobians are detached.

        Returns:
            ``(Js, f)``: ``Js`` `(B, C, P_last)`, ``f`` `(B, C)`.

        Raises:
            NotSupportedError: For ``enable_backprop=True``.
        """
        _no_backprop(enable_backprop, "last_layer_jacobians")
        Js, f = self.curvature.last_layer_jacobians(x)
        return Js.transpose(1, 2), f

    def selected_output_jacobians(self, x: Tensor, outputs: Tensor,
                                  enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Jacobians of selected outputs per sample (laplace-torch's ``selected_output_jacobians``).

        Args:
            x: Inputs `(B, ...)`.
            outputs: Indices of the outputs, one per sample `(B,)` or ``K`` per sample `(B, K)`.
            enable_backprop: Must be False: curvop's Jacobians are detached.

        Returns:
            ``(Js, f)``: ``Js`` `(B, K, P)` (`(B, 1, P)` for `(B,)` indices), ``f`` `(B, C)`.

        Raises:
            InputError: If ``outputs`` is not `(B,)` or `(B, K)`.
            NotSupportedError: For ``enable_backprop=True``.
        """
        Js, f = self.jacobians(x, enable_backprop)
        outputs = outputs[:, None] if outputs.ndim == 1 else outputs
        if outputs.ndim != 2 or outputs.shape[0] != Js.shape[0]:
            raise InputError(f"`outputs` must be (B,) or (B, K) with B = {Js.shape[0]}; got "
                             f"shape {tuple(outputs.shape)}")
        index = outputs.to(Js.device, torch.long).unsqueeze(-1).expand(-1, -1, Js.shape[-1])
        return Js.gather(1, index), f

    def gradients(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample gradients of ``lossfunc`` (no ``factor``), laplace-torch's convention.

        Args:
            x: Inputs `(B, ...)`.
            y: Targets `(B,)` (classification) or `(B, C)` (regression).

        Returns:
            ``(Gs, loss)``: ``Gs`` `(B, P)` and ``lossfunc(f, y)``.
        """
        loss, Gs = self.curvature.gradients(x, y)
        return Gs / self.factor, loss / self.factor

    def full(self, x: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The dense curvature of the batch, in laplace-torch's scale.

        Args:
            x: Inputs `(B, ...)`.
            y: Targets `(B,)` or `(B, C)`.
            **kwargs: Only laplace-torch's ``N`` (ignored).

        Returns:
            ``(loss, H)``: ``factor * lossfunc`` and ``H`` `(P, P)`.

        Raises:
            InputTypeError: For an option other than ``N``.
        """
        _no_options(kwargs, "full")
        loss, H = self.curvature.full(x, y)
        return loss, H * self._scale

    def diag(self, x: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The exact diagonal of the batch's curvature, in laplace-torch's scale.

        Args:
            x: Inputs `(B, ...)`.
            y: Targets `(B,)` or `(B, C)`.
            **kwargs: Only laplace-torch's ``N`` (ignored).

        Returns:
            ``(loss, h)``: ``factor * lossfunc`` and ``h`` `(P,)`.

        Raises:
            InputTypeError: For an option other than ``N``.
        """
        _no_options(kwargs, "diag")
        loss, h = self.curvature.diag(x, y)
        return loss, h * self._scale

    def kron(self, x: Tensor, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, LaplaceKron]:
        """Kronecker factors of the batch as laplace-torch's ``Kron``.

        Args:
            x: Inputs `(B, ...)`.
            y: Targets `(B,)` or `(B, C)`.
            N: Size of the whole data set (the input-side factors are divided by it).
            **kwargs: Options of curvop's ``kron`` (``approx``, ``fallback``).

        Returns:
            ``(loss, H)``: ``factor * lossfunc`` and a ``laplace.utils.matrix.Kron`` (see
            :func:`to_laplace_kron` for the scaling).
        """
        loss, K = self.curvature.kron(x, y, N, **kwargs)
        return loss, to_laplace_kron(K, self._curvature_factor, self._scale, self.params)

    def eig_lowrank(self, data_loader: Iterable) -> tuple[Tensor, Tensor, Tensor]:
        """Top ``low_rank`` eigenpairs of the curvature over a data set.

        What laplace-torch's ``LowRankLaplace.fit`` calls (curvop's ``eig_lowrank``).

        Args:
            data_loader: An iterable of ``(x, y)`` batches that yields the same batches on
                every pass.

        Returns:
            ``(U, eigenvalues, loss)``: ``U`` `(P, k)`, eigenvalues `(k,)` in laplace-torch's
            scale, and the summed loss.
        """
        U, lam, loss = self.curvature.eig_lowrank(data_loader)
        return U, lam * self._scale, loss


def _backend_class(curvop_class: type[CurvatureInterface], kind: str) -> type[CurvopBackend]:
    name = "Curvop" + curvop_class.__name__.removeprefix("Torch")
    doc = (f"laplace-torch backend: the {kind.upper() if kind != 'hessian' else 'Hessian'} "
           f"of :class:`curvop.{curvop_class.__name__}`; see :class:`CurvopBackend`.")
    return type(name, (CurvopBackend, LAPLACE_BASES[kind]),
                {"__module__": __name__, "__qualname__": name, "__doc__": doc,
                 "curvop_class": curvop_class, "kind": kind})


#: backend name → kind → laplace-torch backend class (mirrors ``BACKENDS``)
LAPLACE_BACKENDS: dict[str, dict[str, type[CurvopBackend]]] = {
    backend: {kind: _backend_class(cls, kind) for kind, cls in kinds.items()}
    for backend, kinds in BACKENDS.items()
}
_NAMES = {cls.__name__: cls for kinds in LAPLACE_BACKENDS.values() for cls in kinds.values()}
globals().update(_NAMES)


class LowRankLaplace(_laplace.LowRankLaplace):
    """laplace-torch's ``LowRankLaplace``, fitted through a curvop backend's ``eig_lowrank``.

    laplace-torch 0.3 refuses to construct its ``LowRankLaplace`` unless the old ``asdfghjkl``
    package is importable; this subclass only drops that check and defaults to
    ``CurvopHessian``. Everything else (fit, predictive, marginal likelihood) is laplace-torch's.

    ``fit(train_loader)`` passes the loader to curvop's ``eig_lowrank``, which streams it several
    times: it must yield the same batches in the same order on every pass (``shuffle=False``).

    Args:
        model: The network.
        likelihood: ``'classification'`` or ``'regression'``.
        backend: A backend class with ``eig_lowrank`` (default ``CurvopHessian``).
        sigma_noise: Observation noise (regression), as in laplace-torch.
        prior_precision: Precision of the Gaussian prior, as in laplace-torch.
        prior_mean: Mean of the prior, as in laplace-torch.
        temperature: Temperature of the likelihood, as in laplace-torch.
        enable_backprop: As in laplace-torch (curvop's Jacobians are detached, so leave it
            False).
        dict_key_x: Accepted for laplace-torch; curvop takes tensor inputs only.
        dict_key_y: As ``dict_key_x``.
        backend_kwargs: Options of the backend (e.g. ``{"low_rank": 20}``).

    Raises:
        NotSupportedError: If ``backend`` has no ``eig_lowrank``.
        InputError: From ``fit``, if the loader changes between passes (e.g. it shuffles).
    """

    # not a (subset, structure) pair: laplace.Laplace() never picks this class by accident
    _key = ("all", "lowrank", "curvop")

    def __init__(self, model: nn.Module, likelihood: str, backend: type | None = None,
                 sigma_noise: float | Tensor = 1, prior_precision: float | Tensor = 1,
                 prior_mean: float | Tensor = 0, temperature: float = 1,
                 enable_backprop: bool = False, dict_key_x: str = "input_ids",
                 dict_key_y: str = "labels", backend_kwargs: dict[str, Any] | None = None
                 ) -> None:
        backend = LAPLACE_BACKENDS["torch"]["hessian"] if backend is None else backend
        if not callable(getattr(backend, "eig_lowrank", None)):
            raise NotSupportedError(
                f"LowRankLaplace needs a backend with `eig_lowrank`; got {backend!r}. Use "
                "CurvopHessian, CurvopGGN or CurvopAsdlHessian")
        _ParametricLaplace.__init__(
            self, model, likelihood, sigma_noise=sigma_noise, prior_precision=prior_precision,
            prior_mean=prior_mean, temperature=temperature, enable_backprop=enable_backprop,
            dict_key_x=dict_key_x, dict_key_y=dict_key_y, backend=backend,
            backend_kwargs=backend_kwargs)


def Laplace(model: nn.Module, likelihood: str, subset_of_weights: str = "last_layer",
            hessian_structure: str = "kron", *args: Any, **kwargs: Any):
    """``laplace.Laplace`` with curvop backends by default and a working ``'lowrank'``.

    ``backend`` defaults to ``CurvopGGN`` (``CurvopHessian`` for ``hessian_structure=
    'lowrank'``, which gives :class:`LowRankLaplace`); every other argument is laplace-torch's.

    Args:
        model: The network.
        likelihood: ``'classification'`` or ``'regression'``.
        subset_of_weights: ``'last_layer'``, ``'subnetwork'`` or ``'all'``.
        hessian_structure: ``'kron'``, ``'diag'``, ``'full'`` or (with ``'all'``)
            ``'lowrank'``.
        *args: Passed on to laplace-torch.
        **kwargs: Passed on to laplace-torch (``backend``, ``prior_precision``, ...).

    Returns:
        The laplace-torch Laplace object (a :class:`LowRankLaplace` for ``'all'`` +
        ``'lowrank'``).

    Raises:
        ValueError: For combinations laplace-torch rejects (its own error).
    """
    if (subset_of_weights, hessian_structure) == ("all", "lowrank"):
        return LowRankLaplace(model, likelihood, *args, **kwargs)
    kwargs.setdefault("backend", LAPLACE_BACKENDS["torch"]["ggn"])
    return _laplace.Laplace(model, likelihood, subset_of_weights, hessian_structure, *args,
                            **kwargs)


__all__ = ["CurvopBackend", "LAPLACE_BACKENDS", "LAPLACE_BASES", "CURVOP_POWER", "LAPLACE_POWER",
           "FACTOR_POWER", "Laplace", "LowRankLaplace", "to_laplace_kron", *_NAMES]
