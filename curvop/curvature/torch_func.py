"""The native backend: TorchGGN, TorchEF, TorchHessian, on torch.func only.

Works for any ``nn.Module`` that ``torch.func`` can trace and ``vmap`` over samples (LayerNorm,
BatchNorm in eval mode, non-``Sequential`` modules, frozen parameters). Nothing of size
`(B, C, P)` is formed except by :meth:`jacobians`, which returns it: ``diag`` and ``full`` stream
per-sample products ``S_nᵀ J_n`` in chunks bounded by ``memory_budget``.

Transformers (``nn.TransformerEncoder``/``Decoder``, ``nn.MultiheadAttention``,
``F.scaled_dot_product_attention``) and RNNs work unchanged: every model evaluation swaps the
fused kernels that lack higher derivatives for composite ones (:mod:`curvop._kernels`) and
restores the user's settings. Active dropout (training mode, ``p > 0``) raises, since it makes
the curvature random. Token-level outputs `(B, T, C)` are supported (each sequence one sample,
loss summed over tokens, ``ignore_index`` for padding; see
:class:`~curvop.curvature.CurvatureInterface`), and ``kron`` factors attention's packed
``in_proj_weight`` per query/key/value (:mod:`curvop.kfac`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from curvop import _checks
from curvop._functional import Batch
from curvop._sqrt_form import (
    ef_sqrt,
    output_hessian_product,
    sqrt_form_diag,
    sqrt_form_full,
    sqrt_vjp_chunks,
)
from curvop.curvature.interface import (
    CurvatureInterface,
    EFInterface,
    GGNInterface,
    HessianOperatorMixin,
)
from curvop.kfac import kron_hook
from curvop.operators._products import HessianProducts

__all__ = ["TorchGGN", "TorchEF", "TorchHessian"]


class _TorchBase:
    """Hooks shared by the three native classes: Jacobians and per-sample gradients."""

    alternative = "TorchGGN / TorchEF / TorchHessian"
    supports_sequence_outputs = True

    def _jacobians(self, batch: Batch) -> Tensor:
        return batch.jacobians(slice(None))

    def _gradients(self, batch: Batch) -> Tensor:
        return batch.gradients(slice(None))


class TorchGGN(_TorchBase, GGNInterface):
    """Exact GGN (or MC Fisher with ``stochastic=True``) with torch.func.

    Args:
        model, likelihood, last_layer, subnetwork_indices, stochastic, num_samples, generator:
            See :class:`~curvop.curvature.GGNInterface`.
        low_rank: Number of eigenpairs :meth:`eig_lowrank` returns.
        **kwargs: ``memory_budget``, ``max_bytes``, ``ignore_index``.

    Raises:
        InputError, InputTypeError: If an argument is malformed (see
            :class:`~curvop.curvature.GGNInterface`), or ``low_rank`` is not a positive int.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                           torch.nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
        >>> loss, H = TorchGGN(net, 'classification').full(x, y)
        >>> tuple(H.shape), bool(torch.allclose(H, H.T))
        ((26, 26), True)
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"_jacobians", "_gradients", "_full", "_diag", "_full_operator", "_kron"})
    # the outputs come from the tapped forward of KFAC / the closed-form diagonal
    _defers_forward: ClassVar[frozenset[str]] = frozenset({"kron", "diag"})

    def __init__(self, model: nn.Module, likelihood: str, last_layer: bool = False,
                 subnetwork_indices: Tensor | None = None, stochastic: bool = False,
                 num_samples: int = 1, generator: torch.Generator | None = None,
                 low_rank: int = 10, **kwargs) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, stochastic,
                         num_samples, generator, **kwargs)
        self.low_rank = _checks.check_positive_int(low_rank, "low_rank")
        self._verified_taps: set = set()  # structures whose layer taps passed their check

    def _sqrt_jacobian_chunks(self, batch: Batch, S: Tensor):
        return sqrt_vjp_chunks(batch, S)

    def _diag(self, batch: Batch) -> Tensor:
        return sqrt_form_diag(batch, self._sqrt_output_hessian, self._verified_taps)

    def _full(self, batch: Batch) -> Tensor:
        # Assembling from per-sample products costs about K backward passes of the batch;
        # products with identity columns cost P forward+backward passes: pick the cheaper.
        S = self._sqrt_output_hessian(batch)
        if batch.sel.num_params >= S.shape[-1]:
            return sqrt_form_full(batch, S)
        lam = output_hessian_product(S)
        return batch.materialise(lambda V: batch.ggn_columns(V, lam))

    def _kron(self, batch: Batch, N: int, **kwargs):
        """KFAC of the GGN (KFLR) or, with ``stochastic=True``, the MC Fisher; see curvop.kfac.

        Options: ``approx`` (``'expand'`` or ``'reduce'``), ``fallback`` (``None``, ``'diag'``,
        ``'full'``).
        """
        return kron_hook(self, batch, N, self._sqrt_output_hessian, **kwargs)


class TorchEF(_TorchBase, EFInterface):
    """Empirical Fisher with torch.func per-sample gradients.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(3, 2).double()
        >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
        >>> loss, Gs = TorchEF(net, 'regression').gradients(x, y)
        >>> torch.allclose(TorchEF(net, 'regression').diag(x, y)[1], Gs.square().sum(0))
        True
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"_jacobians", "_gradients", "_full", "_diag", "_full_operator", "_kron"})
    # the outputs come from the tapped forward of KFAC / the closed-form diagonal
    _defers_forward: ClassVar[frozenset[str]] = frozenset({"kron", "diag"})

    def __init__(self, model: nn.Module, likelihood: str, last_layer: bool = False,
                 subnetwork_indices: Tensor | None = None, **kwargs) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, **kwargs)
        self._verified_taps: set = set()

    # g_n = J_nᵀ r_n: the EF is the square-root form with S_n = r_n (one column)
    def _diag(self, batch: Batch) -> Tensor:
        return sqrt_form_diag(batch, ef_sqrt, self._verified_taps)

    def _full(self, batch: Batch) -> Tensor:
        return sqrt_form_full(batch, ef_sqrt(batch))

    def _kron(self, batch: Batch, N: int, **kwargs):
        """KFAC of the empirical Fisher (``S = r``, the output gradients); see curvop.kfac."""
        return kron_hook(self, batch, N, ef_sqrt, **kwargs)


class TorchHessian(_TorchBase, HessianOperatorMixin, CurvatureInterface):
    """The Hessian of the loss with torch.func (forward-over-reverse products).

    Args:
        model, likelihood, last_layer, subnetwork_indices: See
            :class:`~curvop.curvature.CurvatureInterface`.
        low_rank: Number of eigenpairs :meth:`eig_lowrank` returns.
        **kwargs: ``memory_budget``, ``max_bytes``, ``ignore_index``.

    Raises:
        InputError, InputTypeError: If an argument is malformed (see
            :class:`~curvop.curvature.CurvatureInterface`), or ``low_rank`` is not a positive
            int.
    """

    supports: ClassVar[frozenset[str]] = frozenset(
        {"_jacobians", "_gradients", "_full", "_diag", "_full_operator"})
    #: only ``kron`` is missing here, and the Hessian has no Kronecker-factored form to offer
    alternative: ClassVar[str] = (
        "TorchGGN(...).kron or TorchEF(...).kron (KFAC of the GGN / empirical Fisher; the "
        "Hessian has no Kronecker-factored form here)")

    def __init__(self, model: nn.Module, likelihood: str, last_layer: bool = False,
                 subnetwork_indices: Tensor | None = None, low_rank: int = 10,
                 **kwargs) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, **kwargs)
        self.low_rank = _checks.check_positive_int(low_rank, "low_rank")

    def _full(self, batch: Batch) -> Tensor:
        return batch.materialise(_hessian_columns(batch))

    def _diag(self, batch: Batch) -> Tensor:
        # The exact Hessian diagonal has no cheaper general form than P products
        return batch.diagonal_by_columns(_hessian_columns(batch))


def _hessian_columns(batch: Batch) -> Callable[[Tensor], Tensor]:
    """Hessian times rows of `(k, P)` matrices, for materialising.

    Forward-over-reverse under ``vmap`` (:meth:`Batch.hvp_columns`); where a layer has no
    forward-mode AD (cuDNN-off LSTM cells on CUDA, ``_thnn_fused_lstm_cell``), reverse-over-
    reverse through one retained double-backward graph (:class:`HessianProducts`) from the
    first failing chunk on.
    """
    reverse: list[HessianProducts] = []

    def product(V: Tensor) -> Tensor:
        if not reverse:
            try:
                return batch.hvp_columns(V)
            except NotImplementedError:  # "Trying to use forward AD with ..."
                reverse.append(HessianProducts(batch))
        return reverse[0].matmat(V)

    return product
