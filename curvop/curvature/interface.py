"""CurvatureInterface, GGNInterface, EFInterface: the public template methods.

Every public method does the same steps — validate → select parameters → inside
:func:`~curvop._model_guard.model_guard` call one private backend hook → documented layout →
return. Backends implement only the hooks (``_jacobians``, ``_gradients``, ``_full``, ``_diag``,
``_kron``, ...) and list what they support in ``supports``; asking for anything else raises a
:class:`~curvop.errors.NotSupportedError` naming the class, the method and a backend that can,
before any work.

:class:`GGNInterface` and :class:`EFInterface` say *what* is computed (the GGN from the
loss-Hessian square root of :mod:`curvop.likelihoods`, the EF from per-sample gradients);
backend classes say *how*.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from linear_operator.operators import DiagLinearOperator, LinearOperator
from torch import Tensor, nn

from curvop import _checks
from curvop._functional import Batch, FunctionalModel, PendingBatch
from curvop._gram import gram_of_rows
from curvop._kernels import differentiable_kernels, has_rnn
from curvop._model_guard import ModelSnapshot, model_guard
from curvop.errors import InputTypeError, NotSupportedError
from curvop.feature_extractor import FeatureExtractor
from curvop.likelihoods import Likelihood, TokenClassification
from curvop.operators import EFLinearOperator, GGNLinearOperator, HessianLinearOperator
from curvop.operators.dataset import DatasetLinearOperator
from curvop.params import ParameterSelection

__all__ = ["CurvatureInterface", "GGNInterface", "EFInterface", "HessianOperatorMixin"]

#: working memory of chunked computations, in bytes, unless the user says otherwise
DEFAULT_MEMORY_BUDGET = 1 << 28


class CurvatureInterface:
    """Curvature of ``factor * lossfunc(model(x), y)`` (summed over the batch) in the parameters.

    Args:
        model: A ``torch.nn.Module`` or a :class:`~curvop.FeatureExtractor`.
        likelihood: ``'classification'`` or ``'regression'``.
        last_layer: Only the last layer's parameters (wraps ``model`` in a FeatureExtractor).
        subnetwork_indices: Optional 1-D ``LongTensor`` of unique indices into the selected
            parameter vector (``model.parameters()`` order, trainable only, row-major).
        memory_budget: Working memory in bytes for chunked computations (default: 256 MiB on
            the CPU, a thirty-second of the GPU's memory on CUDA, at least 256 MiB).
        max_bytes: Largest result a materialisation may allocate; default the free memory of
            the model's device.
        ignore_index: For token-level classification (outputs `(B, T, C)`, labels `(B, T)`):
            the label of tokens that do not count (padding), as in ``nn.CrossEntropyLoss``.

    **Token-level outputs.** Backends with ``supports_sequence_outputs`` (the native ones)
    accept models whose output is `(B, T, C)` — a sequence of ``T`` tokens, classes (or
    regression outputs) in the last dimension. The loss is summed over tokens (and the batch);
    each sequence is one sample whose output vector is the flattened `(T·C,)`, token-major:
    ``jacobians`` returns ``Js`` `(B, P, T·C)` and ``f`` `(B, T, C)`, ``gradients`` one
    gradient per sequence `(B, P)`, the curvatures stay `(P, P)`. Λ of a sequence is
    block-diagonal over its tokens; tokens labelled ``ignore_index`` contribute nothing.
    Targets are `(B, T)` labels (classification) or `(B, T, C)` values (regression). For 2-D
    outputs `(B, C)` every label must be a class (drop a sample instead of ignoring it).

    Attributes:
        model, likelihood, last_layer, subnetwork_indices: As given (``model`` wrapped when
            ``last_layer``).
        lossfunc: ``MSELoss(reduction='sum')`` or ``CrossEntropyLoss(reduction='sum')``.
        factor: `0.5` for regression, `1.0` for classification.

    Raises:
        InputTypeError: If ``model``, ``last_layer`` or ``subnetwork_indices`` has a wrong type.
        InputError: If ``likelihood`` is unknown or ``subnetwork_indices`` is out of range or
            holds duplicates.
    """

    #: private hooks this class implements
    supports: ClassVar[frozenset[str]] = frozenset()
    #: which backend to suggest when a method is not supported
    alternative: ClassVar[str] = "TorchGGN / TorchEF / TorchHessian"
    #: whether token-level outputs `(B, T, C)` are supported
    supports_sequence_outputs: ClassVar[bool] = False
    #: the hooks (``'kron'``, ``'diag'``) that take a :class:`~curvop._functional.PendingBatch`
    #: and compute the outputs in their own forward pass (the native backend's tapped pass),
    #: saving a forward without graph
    _defers_forward: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: Tensor | None = None,
        *,
        memory_budget: int | None = None,
        max_bytes: int | None = None,
        ignore_index: int = -100,
    ) -> None:
        _checks.check_model(model)
        self._likelihood = _checks.check_likelihood(likelihood)
        if not isinstance(last_layer, bool):
            raise InputTypeError(f"`last_layer` must be a bool; got {type(last_layer).__name__}")
        if last_layer and not isinstance(model, FeatureExtractor):
            model = FeatureExtractor(model)
        self.model = model
        self.likelihood = self._likelihood.value
        self.last_layer = last_layer
        self.ignore_index = _checks.check_ignore_index(ignore_index)
        self.lossfunc = self._likelihood.lossfunc()
        if isinstance(self.lossfunc, nn.CrossEntropyLoss):
            self.lossfunc.ignore_index = self.ignore_index
        self.factor = self._likelihood.factor
        self.memory_budget = None if memory_budget is None else _checks.check_positive_int(
            memory_budget, "memory_budget")
        self.max_bytes = None if max_bytes is None else _checks.check_positive_int(
            max_bytes, "max_bytes")
        self.subnetwork_indices = _checks.check_subnetwork_indices(
            subnetwork_indices, ParameterSelection(self._param_module).total
        )

    # --- selection and validation --------------------------------------------------------

    @property
    def _param_module(self) -> nn.Module:
        return self.model.last_layer if self.last_layer else self.model

    def _selection(self) -> ParameterSelection:
        return ParameterSelection(self._param_module, self.subnetwork_indices)

    @property
    def num_params(self) -> int:
        """``P``, the number of selected parameters."""
        return self._selection().num_params

    def _require(self, hook: str, method: str) -> None:
        if hook not in self.supports:
            raise NotSupportedError(
                f"{type(self).__name__} does not support `{method}`; use {self.alternative}"
            )

    def _batch(self, x: Tensor, y: Tensor | None, sel: ParameterSelection,
               defer: bool = False, snap: ModelSnapshot | None = None) -> Batch | PendingBatch:
        """Validate ``x``/``y``, compute features (last layer) and outputs without a graph.

        Token-level outputs `(B, T, C)` are flattened to `(B, T·C)` (and regression targets
        with them); ``event_shape`` keeps `(T, C)`. With ``defer`` the outputs are left to the
        caller's own forward pass (a :class:`~curvop._functional.PendingBatch`). ``snap``, the
        :func:`~curvop._model_guard.model_guard` snapshot taken on entry, lists the parameters
        without another walk over the modules.
        """
        _checks.check_inputs(x, sel.device, finite=False)
        _checks.check_no_batch_coupling(self.model)
        _checks.check_deterministic(self.model)
        params = snap.params if snap is not None else list(self.model.parameters())
        _checks.check_finite_parameters(
            [p for p in params if p.requires_grad],
            lambda: ((n, p) for n, p in self.model.named_parameters() if p.requires_grad), x)
        if self.last_layer:
            with torch.no_grad(), _checks.forbid_randomness(sel.device):
                with differentiable_kernels(has_rnn(self.model)):
                    x = self.model.forward_with_features(x)[1].detach()
        fm = FunctionalModel(self._param_module, sel)
        pending = PendingBatch(fm, x, lambda f: self._finish_batch(fm, x, y, f),
                               self._working_budget(sel.device),
                               lambda: _checks.forbid_randomness(sel.device))
        return pending if defer else pending.forward_without_graph()

    def _finish_batch(self, fm: FunctionalModel, x: Tensor, y: Tensor | None,
                      f: Tensor) -> Batch:
        """The :class:`Batch` of outputs ``f`` `(B, C)` or `(B, T, C)`: checks, targets, tokens."""
        _checks.check_outputs(f, self._likelihood, sequence=True)
        if f.dim() == 2:
            if y is not None:
                y = _checks.check_targets(y, x.shape[0], f.shape[1], self._likelihood)
            return Batch(fm, x, y, f, self._likelihood, self._working_budget(f.device))
        if not self.supports_sequence_outputs:
            raise NotSupportedError(
                f"{type(self).__name__} does not support token-level outputs (batch, seq, "
                f"outputs); got {tuple(f.shape)}. Use {self.alternative}")
        _, T, C = f.shape
        if y is not None:
            y = _checks.check_sequence_targets(y, x.shape[0], T, C, self._likelihood,
                                               self.ignore_index)
        likelihood = (TokenClassification(C, self.ignore_index)
                      if self._likelihood is Likelihood.CLASSIFICATION else self._likelihood)
        return Batch(fm, x, y, f.flatten(1), likelihood, self._working_budget(f.device),
                     (T, C))

    def _working_budget(self, device: torch.device) -> int:
        """The working memory of chunked computations on ``device``, in bytes.

        ``memory_budget`` where given; otherwise 256 MiB on the CPU and a thirty-second of the
        device's memory on a GPU (at least 256 MiB: 2.5 GiB on an 80 GB H100). A GPU is bound
        by kernel launches, which every further chunk repeats: the CNN's KFAC took five chunks
        of 256 MiB, three times the kernels of one. The total, not the free memory, keeps the
        chunks (and so the rounding) the same from call to call.
        """
        if self.memory_budget is not None:
            return self.memory_budget
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            return max(DEFAULT_MEMORY_BUDGET, total // 32)
        return DEFAULT_MEMORY_BUDGET

    def _check_result(self, shape: tuple[int, ...], sel: ParameterSelection, what: str) -> None:
        _checks.check_fits(shape, sel.dtype, sel.device, what, self.max_bytes)

    # --- public template methods ---------------------------------------------------------

    def jacobians(self, x: Tensor, enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians of the outputs in the selected parameters.

        Args:
            x: Inputs `(B, ...)`.
            enable_backprop: Accepted for laplace-torch compatibility; results are detached.

        Returns:
            ``(Js, f)``: ``Js`` `(B, P, C)`, ``f`` `(B, C)` (token-level outputs: ``Js``
            `(B, P, T·C)`, token-major, and ``f`` `(B, T, C)`).

        Raises:
            InputError: If ``x`` is malformed or non-finite, or the output is not `(B, C)`
                (or `(B, T, C)`).
            NotSupportedError: If the model's forward is random (active dropout), or it has
                token-level outputs and the backend does not support them.
            MemoryBudgetError: If ``Js`` cannot fit.
        """
        self._require("_jacobians", "jacobians")
        with model_guard(self.model) as snap:
            sel = self._selection()
            batch = self._batch(x, None, sel, snap=snap)
            self._check_result((batch.size, sel.num_params, batch.f.shape[1]), sel, "Js")
            Js = self._jacobians(batch)
        f = batch.f if batch.event_shape is None else batch.f.reshape(-1, *batch.event_shape)
        return Js.transpose(1, 2), f

    def last_layer_jacobians(self, x: Tensor, enable_backprop: bool = False
                             ) -> tuple[Tensor, Tensor]:
        """Per-sample Jacobians in the last layer's parameters, whatever ``last_layer`` is.

        Args:
            x: Inputs `(B, ...)`.
            enable_backprop: Accepted for laplace-torch compatibility; results are detached.

        Returns:
            ``(Js, f)``: ``Js`` `(B, P_last, C)`, ``f`` `(B, C)`.

        Raises:
            InputError: If ``x`` is malformed or the last layer cannot be found.
        """
        if self.last_layer:
            return self.jacobians(x, enable_backprop)
        view = type(self).__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.model, view.last_layer, view.subnetwork_indices = (
            FeatureExtractor(self.model), True, None)
        return view.jacobians(x, enable_backprop)

    def gradients(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample gradients of the loss (``factor`` included).

        Args:
            x: Inputs `(B, ...)`.
            y: Targets: labels `(B,)` (classification) or values `(B, C)` (regression);
                `(B, T)` / `(B, T, C)` for token-level outputs.

        Returns:
            ``(loss, Gs)``: the summed loss (scalar) and ``Gs`` `(B, P)`.

        Raises:
            InputError: On malformed ``x``/``y`` (batch sizes, label range, finiteness).
        """
        self._require("_gradients", "gradients")
        with model_guard(self.model) as snap:
            sel = self._selection()
            batch = self._batch(x, y, sel, snap=snap)
            self._check_result((batch.size, sel.num_params), sel, "Gs")
            Gs = self._gradients(batch)
        return batch.loss(), Gs

    def full(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The dense curvature of the batch.

        Args:
            x: Inputs `(B, ...)`.
            y: Targets: labels `(B,)` (classification) or values `(B, C)` (regression);
                `(B, T)` / `(B, T, C)` for token-level outputs.

        Returns:
            ``(loss, H)``: ``H`` `(P, P)`.

        Raises:
            InputError: On malformed ``x``/``y``.
            MemoryBudgetError: If a `(P, P)` matrix cannot fit (raised before allocating).
        """
        self._require("_full", "full")
        with model_guard(self.model) as snap:
            sel = self._selection()
            self._check_result((sel.num_params, sel.num_params), sel, "the full curvature")
            batch = self._batch(x, y, sel, snap=snap)
            H = self._full(batch)
        return batch.loss(), H

    def diag(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The exact diagonal of the curvature of the batch.

        Args:
            x: Inputs `(B, ...)`.
            y: Targets: labels `(B,)` (classification) or values `(B, C)` (regression);
                `(B, T)` / `(B, T, C)` for token-level outputs.

        Returns:
            ``(loss, h)``: ``h`` `(P,)`.

        Raises:
            InputError: On malformed ``x``/``y``.
        """
        self._require("_diag", "diag")
        with model_guard(self.model) as snap:
            sel = self._selection()
            batch = self._batch(x, y, sel, defer="diag" in self._defers_forward, snap=snap)
            h = self._diag(batch)
        return batch.loss(), h

    def full_operator(self, x: Tensor, y: Tensor) -> tuple[Tensor, LinearOperator]:
        """The curvature of the batch as a matrix-free `(P, P)` LinearOperator.

        ``op.to_dense()`` equals ``full(x, y)[1]``; ``op @ v`` runs Jacobian-vector and
        vector-Jacobian products through the model (on its device) for ``v`` `(P,)`,
        `(P, k)` or `(*b, P, k)`. The operator keeps ``x``, ``y`` and references the model.

        Args:
            x: Inputs `(B, ...)`.
            y: Targets: labels `(B,)` (classification) or values `(B, C)` (regression);
                `(B, T)` / `(B, T, C)` for token-level outputs.

        Returns:
            ``(loss, op)``.

        Raises:
            InputError: On malformed ``x``/``y``.
        """
        self._require("_full_operator", "full_operator")
        with model_guard(self.model) as snap:
            sel = self._selection()
            batch = self._batch(x, y, sel, snap=snap)
            op = self._full_operator(batch)
        return batch.loss(), op

    def _rebuild_operator(self, x: Tensor, y: Tensor, S: Tensor | None) -> LinearOperator:
        """``full_operator``'s operator again, with square-root columns ``S`` kept fixed."""
        with model_guard(self.model) as snap:
            sel = self._selection()
            batch = self._batch(x, y, sel, snap=snap)
            if S is None:
                return self._full_operator(batch)
            return GGNLinearOperator(*batch.theta, batch=batch, S=S)

    def dataset_operator(self, loader, cache: bool | None = None,
                         progress: bool | None = None) -> DatasetLinearOperator:
        """The curvature summed over every ``(x, y)`` batch of ``loader``, matrix-free.

        Products stream the batches (on the model's device). See
        :class:`~curvop.operators.dataset.DatasetLinearOperator`.

        Args:
            loader: Re-iterable ``(x, y)`` batches in a fixed order (e.g. a ``DataLoader``
                with ``shuffle=False``).
            cache: Keep per-batch linearisations (default: while within ``memory_budget``).
            progress: tqdm bar on every pass (default: for more than 10 batches).

        Returns:
            A `(P, P)` :class:`~curvop.operators.dataset.DatasetLinearOperator`; its ``loss`` is the
            summed loss.

        Raises:
            InputError: If the loader is empty, or yields other data on a later pass.
        """
        self._require("_full_operator", "dataset_operator")
        theta = self._selection().detached()
        return DatasetLinearOperator(*theta, interface=self, loader=loader, cache=cache,
                                     progress=progress)

    def eig_lowrank(self, data_loader, tol: float = 1e-8, maxiter: int | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """Top ``low_rank`` eigenpairs of the curvature summed over ``data_loader``.

        Found matrix-free by :func:`curvop.linalg.top_eigenpairs` over the loader's data-set
        operator: for a GGN / MC Fisher / EF of a network of ``nn.Linear`` layers through the
        data-space dual (the top eigenpairs of the `(R, R)` Gram matrix, exact to rounding),
        otherwise by implicitly restarted Lanczos (``scipy.sparse.linalg.eigsh``) over products
        that stream the loader. "Top" means the largest *algebraic* eigenvalues: for an
        indefinite Hessian the most positive ones (negative curvature is never returned); only
        eigenvalues > 1e-6 are kept.

        Args:
            data_loader: Re-iterable ``(x, y)`` batches in a fixed order.
            tol: Relative accuracy of the eigenvalues on the Lanczos route (ARPACK's ``tol``).
            maxiter: Iteration limit on the Lanczos route (ARPACK's; default ``10 P``).

        Returns:
            ``(eigenvectors (P, k), eigenvalues (k,), loss)``, eigenvalues descending.

        Raises:
            NotSupportedError: If this class has no ``low_rank``.
            InputError: If the loader is empty or changes between passes.
        """
        if not hasattr(self, "low_rank"):
            raise NotSupportedError(
                f"{type(self).__name__} has no `low_rank`; use TorchGGN, TorchHessian or "
                "AsdlHessian for eig_lowrank")
        from curvop.linalg.eigen import top_eigenpairs

        op = self.dataset_operator(data_loader)
        vecs, vals = top_eigenpairs(op, self.low_rank, tol=tol, maxiter=maxiter)
        keep = vals > 1e-6
        return vecs[:, keep], vals[keep], op.loss.detach()

    def diag_operator(self, x: Tensor, y: Tensor) -> tuple[Tensor, DiagLinearOperator]:
        """The exact diagonal as a ``DiagLinearOperator``.

        Args:
            x: Inputs `(B, ...)`.
            y: Targets: labels `(B,)` (classification) or values `(B, C)` (regression);
                `(B, T)` / `(B, T, C)` for token-level outputs.

        Returns:
            ``(loss, op)`` with ``op.diagonal() == diag(x, y)[1]``.

        Raises:
            InputError: On malformed ``x``/``y``.
            NotSupportedError: If this backend has no exact diagonal.
        """
        loss, h = self.diag(x, y)
        return loss, DiagLinearOperator(h)

    def kron(self, x: Tensor, y: Tensor, N: int, **kwargs) -> tuple[Tensor, object]:
        """Kronecker-factored curvature of the batch.

        Args:
            x: Inputs `(B, ...)`.
            y: Targets.
            N: Number of data points in the whole data set.
            **kwargs: Backend options (e.g. ``fallback``).

        Returns:
            ``(loss, H)``: ``H`` a :class:`curvop.Kron`.

        Raises:
            NotSupportedError: If this backend or a layer has no Kronecker form.
        """
        self._require("_kron", "kron")
        N = _checks.check_positive_int(N, "N")
        with model_guard(self.model) as snap:
            sel = self._selection()
            batch = self._batch(x, y, sel, defer="kron" in self._defers_forward, snap=snap)
            H = self._kron(batch, N, **kwargs)
        return batch.loss(), H

    # --- hooks every backend may implement -----------------------------------------------

    def _jacobians(self, batch: Batch) -> Tensor:
        """`(B, C, P)`."""
        raise NotImplementedError

    def _gradients(self, batch: Batch) -> Tensor:
        """`(B, P)`."""
        raise NotImplementedError

    def _full(self, batch: Batch) -> Tensor:
        """`(P, P)`."""
        raise NotImplementedError

    def _diag(self, batch: Batch) -> Tensor:
        """`(P,)`."""
        raise NotImplementedError

    def _kron(self, batch: Batch, N: int, **kwargs) -> object:
        raise NotImplementedError

    def _full_operator(self, batch: Batch) -> LinearOperator:
        raise NotImplementedError


class GGNInterface(CurvatureInterface):
    r"""Generalised Gauss-Newton :math:`G = \sum_n J_n^\top \Lambda_n J_n` (or its MC Fisher).

    With ``stochastic=True`` :math:`\Lambda_n` is replaced by the average of
    :math:`g g^\top` over ``num_samples`` output gradients at labels sampled from the model,
    drawn with ``generator`` so that results are reproducible.

    Args:
        model, likelihood, last_layer, subnetwork_indices: See :class:`CurvatureInterface`.
        stochastic: Monte-Carlo Fisher instead of the exact GGN.
        num_samples: Samples per data point for the MC Fisher.
        generator: A ``torch.Generator`` for the MC samples.
        **kwargs: ``memory_budget``, ``max_bytes``, ``ignore_index``.

    Raises:
        InputTypeError: If ``stochastic`` is not a bool or ``generator`` not a Generator.
        InputError: If ``num_samples`` is not positive.
    """

    def __init__(self, model: nn.Module, likelihood: str, last_layer: bool = False,
                 subnetwork_indices: Tensor | None = None, stochastic: bool = False,
                 num_samples: int = 1, generator: torch.Generator | None = None,
                 **kwargs) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, **kwargs)
        if not isinstance(stochastic, bool):
            raise InputTypeError(f"`stochastic` must be a bool; got {type(stochastic).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise InputTypeError(
                f"`generator` must be a torch.Generator; got {type(generator).__name__}")
        self.stochastic = stochastic
        self.num_samples = _checks.check_positive_int(num_samples, "num_samples")
        self.generator = generator

    def _full_operator(self, batch: Batch) -> LinearOperator:
        return GGNLinearOperator(*batch.theta, batch=batch, S=self._sqrt_output_hessian(batch))

    def _sqrt_output_hessian(self, batch: Batch) -> Tensor:
        """Square root of Λ (exact or sampled) for the batch, `(B, C, K)`."""
        f = batch.f.detach()
        if self.stochastic:
            return batch.likelihood.sampled_sqrt_output_hessian(f, self.num_samples,
                                                                self.generator, y=batch.y)
        return batch.likelihood.sqrt_output_hessian(f, y=batch.y)

    def _sqrt_jacobian_chunks(self, batch: Batch, S: Tensor):
        """Yield ``S_nᵀ J_n`` `(n, K, P)` over chunks of samples (from ``_jacobians``)."""
        K = S.shape[-1]
        for rows in batch.sample_chunks(3 * max(K, batch.f.shape[1]) * batch.sel.num_live
                                        * batch.itemsize):
            sub = Batch(batch.fm, batch.x[rows], None, batch.f[rows], batch.likelihood,
                        batch.budget)
            yield torch.einsum("nck,ncp->nkp", S[rows], self._jacobians(sub))

    def _full(self, batch: Batch) -> Tensor:
        S = self._sqrt_output_hessian(batch)
        return gram_of_rows(self._sqrt_jacobian_chunks(batch, S), batch.f, batch.sel.num_params)

    def _diag(self, batch: Batch) -> Tensor:
        return self._diag_from_sqrt(batch, self._sqrt_output_hessian(batch))

    def _diag_from_sqrt(self, batch: Batch, S: Tensor) -> Tensor:
        h = batch.f.new_zeros(batch.sel.num_params)
        for M in self._sqrt_jacobian_chunks(batch, S):
            h += M.square().sum((0, 1))
        return h


class EFInterface(CurvatureInterface):
    r"""Empirical Fisher :math:`F = \sum_n g_n g_n^\top`, ``g_n`` sample ``n``'s loss gradient."""

    def _full_operator(self, batch: Batch) -> LinearOperator:
        return EFLinearOperator(*batch.theta, batch=batch)

    def _gradient_chunks(self, batch: Batch):
        """Yield per-sample gradients `(n, P)` over chunks of samples."""
        for rows in batch.sample_chunks(3 * batch.sel.num_live * batch.itemsize):
            sub = Batch(batch.fm, batch.x[rows], batch.y[rows], batch.f[rows], batch.likelihood,
                        batch.budget)
            yield self._gradients(sub)

    def _full(self, batch: Batch) -> Tensor:
        return gram_of_rows(self._gradient_chunks(batch), batch.f, batch.sel.num_params)

    def _diag(self, batch: Batch) -> Tensor:
        h = batch.f.new_zeros(batch.sel.num_params)
        for G in self._gradient_chunks(batch):
            h += G.square().sum(0)
        return h


class HessianOperatorMixin:
    """``full_operator`` for Hessian classes (any backend): the matrix-free Hessian."""

    def _full_operator(self, batch: Batch) -> LinearOperator:
        return HessianLinearOperator(*batch.theta, batch=batch)
