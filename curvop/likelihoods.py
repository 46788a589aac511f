r"""Likelihoods: the loss, its ``factor``, and the output Hessian Λ — the only place Λ lives.

curvop's loss is the negative log-likelihood of a batch, summed over the batch:

.. math::

    \ell(f, y) = \text{factor} \cdot \text{lossfunc}(f, y),

with ``lossfunc`` ``CrossEntropyLoss(reduction='sum')`` and ``factor = 1`` for classification,
``MSELoss(reduction='sum')`` and ``factor = 1/2`` for regression (Gaussian, unit noise).

The output Hessian of one sample, :math:`\Lambda_n = \nabla_f^2 \ell(f_n, y_n)` of shape
`(C, C)`, is the identity for regression and :math:`\mathrm{diag}(p) - p p^\top` (``p`` the
softmax of the logits) for classification. Everything that needs Λ asks this module for a
*square root* ``S`` with :math:`\Lambda_n = S_n S_n^\top`, of shape `(B, C, K)`; the Monte-Carlo
Fisher replaces it by ``K = num_samples`` sampled output gradients scaled by
:math:`1/\sqrt{K}`.
"""

from __future__ import annotations

import enum
import math

import torch
from torch import Tensor

__all__ = ["Likelihood"]


class Likelihood(enum.Enum):
    """The two supported likelihoods; ``Likelihood('classification')`` parses the user string."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"

    @property
    def factor(self) -> float:
        """Scale of ``lossfunc`` in the loss: `1.0` (classification) or `0.5` (regression)."""
        return 1.0 if self is Likelihood.CLASSIFICATION else 0.5

    def lossfunc(self) -> torch.nn.Module:
        """A fresh summed torch loss module, as laplace-torch exposes it."""
        if self is Likelihood.CLASSIFICATION:
            return torch.nn.CrossEntropyLoss(reduction="sum")
        return torch.nn.MSELoss(reduction="sum")

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed negative log-likelihood ``factor * lossfunc(f, y)`` of a batch.

        Args:
            f: Model outputs, `(B, C)`.
            y: Targets: class indices `(B,)` (classification) or values `(B, C)` (regression).

        Returns:
            A scalar tensor.
        """
        if self is Likelihood.CLASSIFICATION:
            return torch.nn.functional.cross_entropy(f, y, reduction="sum")
        return 0.5 * torch.nn.functional.mse_loss(f, y, reduction="sum")

    def sample_loss(self, f: Tensor, y: Tensor) -> Tensor:
        """Loss of a single sample, for per-sample gradients: ``f`` `(C,)`, ``y`` `()` or `(C,)`."""
        return self.loss(f.unsqueeze(0), y.unsqueeze(0))

    def output_hessian(self, f: Tensor) -> Tensor:
        """Λ for every sample, `(B, C, C)` (dense; for references and small C)."""
        B, C = f.shape
        if self is Likelihood.REGRESSION:
            return torch.eye(C, dtype=f.dtype, device=f.device).expand(B, C, C).clone()
        p = torch.softmax(f, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def sqrt_output_hessian(self, f: Tensor) -> Tensor:
        r"""A square root ``S`` of Λ with ``S @ S.mT == Λ``, `(B, C, C)`.

        For classification column ``c`` is :math:`\sqrt{p_c}(e_c - p)`; then
        :math:`S S^\top = \mathrm{diag}(p) - 2pp^\top + pp^\top\sum_c p_c = \Lambda`.
        """
        B, C = f.shape
        if self is Likelihood.REGRESSION:
            return torch.eye(C, dtype=f.dtype, device=f.device).expand(B, C, C)
        p = torch.softmax(f, dim=-1)
        eye = torch.eye(C, dtype=f.dtype, device=f.device)
        return (eye - p.unsqueeze(-1)) * p.sqrt().unsqueeze(-2)

    def output_hessian_matmul(self, f: Tensor, v: Tensor) -> Tensor:
        """Λ applied per sample without forming it: ``v`` `(B, C)` or `(k, B, C)` → same shape."""
        if self is Likelihood.REGRESSION:
            return v
        p = torch.softmax(f, dim=-1)
        return p * v - p * (p * v).sum(-1, keepdim=True)

    def output_gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """Gradient of the summed loss in the outputs, `(B, C)`: ``f - y`` or ``p - onehot(y)``."""
        if self is Likelihood.REGRESSION:
            return f - y
        p = torch.softmax(f, dim=-1)
        return p - torch.nn.functional.one_hot(y, f.shape[-1]).to(f.dtype)

    def sampled_sqrt_output_hessian(
        self, f: Tensor, num_samples: int, generator: torch.Generator | None
    ) -> Tensor:
        r"""Monte-Carlo square root of Λ, `(B, C, num_samples)`.

        Labels are drawn from the model's predictive (``Categorical(softmax(f))`` or
        ``Normal(f, I)``) and each column is the output gradient at a sampled label divided by
        :math:`\sqrt{K}`, so ``S @ S.mT`` is the average of ``g gᵀ``: an unbiased estimate of Λ.
        Sampling runs on the generator's device (CPU if none) for reproducibility, then moves.
        """
        B, C = f.shape
        sample_device = generator.device if generator is not None else f.device
        fd = f.detach().to(sample_device)
        if self is Likelihood.CLASSIFICATION:
            p = torch.softmax(fd, dim=-1)
            labels = torch.multinomial(p, num_samples, replacement=True, generator=generator)
            onehot = torch.nn.functional.one_hot(labels, C).to(p.dtype)  # (B, K, C)
            g = p.unsqueeze(1) - onehot
        else:
            g = -torch.randn(
                (B, num_samples, C), dtype=fd.dtype, device=sample_device, generator=generator
            )
        g = g.to(f.device) / math.sqrt(num_samples)
        return g.transpose(1, 2)
