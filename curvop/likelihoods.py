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
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Likelihood", "TokenClassification"]


def softmax_hessian_sqrt(p: Tensor) -> Tensor:
    r"""A square root of the softmax cross-entropy Hessian :math:`\mathrm{diag}(p) - pp^\top`.

    With :math:`q = \sqrt{p}` the Hessian is :math:`D_q (I - qq^\top) D_q`, and
    :math:`I - qq^\top` (``|q| = 1``) projects onto the complement of ``q``. The Householder
    reflection :math:`R = I - vv^\top/(1 + q_k)`, :math:`v = q + e_k`, is orthogonal with
    column ``k`` equal to :math:`-q`, so its other ``C - 1`` columns ``H`` span that complement
    and :math:`S = D_q H` has :math:`SS^\top = D_q(RR^\top - qq^\top)D_q` = the Hessian: a
    square root with ``C - 1`` columns, the Hessian's rank, instead of ``C``. Every product,
    Gram matrix and backpropagation through ``S`` costs ``(C - 1)/C`` of the ``C``-column one.
    ``k`` is the last class: :math:`v^\top v = 2(1 + q_k) \ge 2` whatever ``p`` is (``q``
    is reflected onto :math:`-e_k`, the stable sign), so dropping the last column is a slice.

    Args:
        p: Probabilities `(..., C)`.

    Returns:
        `(..., C, C - 1)`; for ``C = 1`` the (zero) `(..., 1, 1)` root.
    """
    C = p.shape[-1]
    if C < 2:
        return torch.zeros_like(p).unsqueeze(-1)
    q = p.sqrt()
    v = q.clone()
    v[..., -1] += 1
    scale = v[..., :-1] / (1 + q[..., -1:])  # (..., C - 1)
    E = torch.eye(C, C - 1, dtype=p.dtype, device=p.device)
    return q.unsqueeze(-1) * (E - v.unsqueeze(-1) * scale.unsqueeze(-2))


def sample_categorical(p: Tensor, num_samples: int,
                       generator: torch.Generator | None) -> Tensor:
    """Labels `(N, num_samples)` drawn with replacement from the rows of ``p`` `(N, C)`.

    The exponential race: ``argmax_c p_c / E_c`` with ``E_c ~ Exp(1)`` independent is ``c``
    with probability ``p_c / Σ p``. This is what ``torch.multinomial`` itself does for one
    sample (the same draws from the same generator), written here because ``multinomial``
    checks its input with a host synchronisation on CUDA, and draws several samples with a
    different algorithm; ``p`` comes from a softmax of checked outputs, so it is valid.
    """
    N, C = p.shape
    q = torch.empty(N, num_samples, C, dtype=p.dtype, device=p.device).exponential_(
        generator=generator)
    return (p.unsqueeze(1) / q).argmax(-1)


@functools.lru_cache(maxsize=16)
def _classes(C: int, device: torch.device) -> Tensor:
    """``arange(C)`` on ``device``, made once per size and device."""
    return torch.arange(C, device=device)


def minus_one_hot(p: Tensor, labels: Tensor) -> Tensor:
    """``p - F.one_hot(labels, C).to(p.dtype)`` for labels known to lie in ``[0, C)``.

    ``p`` `(..., C)` broadcasts against the labels `(*L,)`; the result is `(*L, C)`. A comparison
    with a cached ``arange(C)``, a cast and a subtraction, all elementwise: ``F.one_hot`` checks
    the labels' range with a host synchronisation on CUDA, and the labels here are checked
    targets or draws from the model's predictive.
    """
    hot = labels.unsqueeze(-1) == _classes(p.shape[-1], labels.device)
    return p - hot.to(p.dtype)


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

    def output_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """Λ for every sample, `(B, C, C)` (dense; for references and small C).

        ``y`` is accepted for a uniform signature with :class:`TokenClassification` (where it
        masks ignored tokens) and unused.
        """
        B, C = f.shape
        if self is Likelihood.REGRESSION:
            return torch.eye(C, dtype=f.dtype, device=f.device).expand(B, C, C).clone()
        p = torch.softmax(f, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def sqrt_output_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        r"""A square root ``S`` of Λ with ``S @ S.mT == Λ`` (``y`` unused).

        Regression: the identity, `(B, C, C)`. Classification: `(B, C, C - 1)` (for ``C ≥ 2``),
        the rank of Λ; see :func:`softmax_hessian_sqrt`.
        """
        B, C = f.shape
        if self is Likelihood.REGRESSION:
            return torch.eye(C, dtype=f.dtype, device=f.device).expand(B, C, C)
        return softmax_hessian_sqrt(torch.softmax(f, dim=-1))

    def output_hessian_matmul(self, f: Tensor, v: Tensor, y: Tensor | None = None) -> Tensor:
        """Λ applied per sample without forming it: ``v`` `(B, C)` or `(k, B, C)` → same shape.

        ``y`` is unused (uniform signature with :class:`TokenClassification`).
        """
        if self is Likelihood.REGRESSION:
            return v
        p = torch.softmax(f, dim=-1)
        return p * v - p * (p * v).sum(-1, keepdim=True)

    def output_gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """Gradient of the summed loss in the outputs, `(B, C)`: ``f - y`` or ``p - onehot(y)``."""
        if self is Likelihood.REGRESSION:
            return f - y
        p = torch.softmax(f, dim=-1)
        return minus_one_hot(p, y)

    def sampled_sqrt_output_hessian(
        self, f: Tensor, num_samples: int, generator: torch.Generator | None,
        y: Tensor | None = None,
    ) -> Tensor:
        r"""Monte-Carlo square root of Λ, `(B, C, num_samples)`.

        Labels are drawn from the model's predictive (``Categorical(softmax(f))`` or
        ``Normal(f, I)``) and each column is the output gradient at a sampled label divided by
        :math:`\sqrt{K}`, so ``S @ S.mT`` is the average of ``g gᵀ``: an unbiased estimate of Λ.
        Sampling runs on the generator's device (the outputs' device if none) for
        reproducibility, then moves: a CPU generator for outputs on a GPU costs a host
        synchronisation and two transfers per call, a generator on the GPU neither.
        ``y`` is unused (uniform signature with :class:`TokenClassification`).
        """
        B, C = f.shape
        sample_device = generator.device if generator is not None else f.device
        fd = f.detach().to(sample_device)
        if self is Likelihood.CLASSIFICATION:
            p = torch.softmax(fd, dim=-1)
            labels = sample_categorical(p, num_samples, generator)  # (B, K)
            g = minus_one_hot(p.unsqueeze(1), labels)  # (B, K, C)
        else:
            g = -torch.randn(
                (B, num_samples, C), dtype=fd.dtype, device=sample_device, generator=generator
            )
        g = g.to(f.device)
        if num_samples > 1:  # one kernel less per call for the common single draw
            g = g / math.sqrt(num_samples)
        return g.transpose(1, 2)


@dataclass(frozen=True)
class TokenClassification:
    r"""Cross-entropy summed over the tokens of each sequence, on flattened outputs.

    A token-level classifier outputs `(B, T, C)` (classes in the **last** dimension, as
    transformers write them — not ``nn.CrossEntropyLoss``'s `(B, C, T)`); curvop sees each
    sequence as one sample with output vector `(T·C,)`, token-major, and targets `(B, T)`. The
    loss of sample ``n`` is :math:`\sum_{t:\,y_{nt} \ne \text{ignore}} \text{CE}(f_{nt}, y_{nt})`,
    so Λ of a sequence is block-diagonal over its tokens, the block of token ``t`` the
    :class:`Likelihood` one, :math:`\mathrm{diag}(p_t) - p_t p_t^\top`, and zero for a token
    labelled ``ignore_index`` (padding): ignored tokens contribute nothing to any curvature.

    Methods mirror :class:`Likelihood` on flattened outputs ``f`` `(B, T·C)`; the ones that
    depend on which tokens count take the labels ``y`` `(B, T)` (``None``: every token counts).

    Args:
        classes: ``C``, the classes per token.
        ignore_index: The label of tokens that do not count.
    """

    classes: int
    ignore_index: int = -100

    value = "classification"
    factor = 1.0

    def lossfunc(self) -> torch.nn.Module:
        """``CrossEntropyLoss(reduction='sum', ignore_index=ignore_index)``."""
        return torch.nn.CrossEntropyLoss(reduction="sum", ignore_index=self.ignore_index)

    def _tokens(self, f: Tensor) -> Tensor:
        return f.reshape(*f.shape[:-1], -1, self.classes)

    def _mask(self, y: Tensor | None, like: Tensor) -> Tensor:
        """`(B, T, 1)` ones for tokens that count, zeros for ignored ones, in ``like``'s dtype."""
        if y is None:
            return like.new_ones(*like.shape[-3:-1], 1)
        return (y != self.ignore_index).to(like.dtype).unsqueeze(-1)

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        """Summed cross-entropy over every counted token of the batch (a scalar)."""
        return torch.nn.functional.cross_entropy(
            f.reshape(-1, self.classes), y.reshape(-1), ignore_index=self.ignore_index,
            reduction="sum")

    def sample_loss(self, f: Tensor, y: Tensor) -> Tensor:
        """Loss of one sequence: ``f`` `(T·C,)`, ``y`` `(T,)`."""
        return self.loss(f.unsqueeze(0), y.unsqueeze(0))

    def output_gradient(self, f: Tensor, y: Tensor) -> Tensor:
        """``p_t - onehot(y_t)`` per counted token, zero for ignored ones: `(B, T·C)`."""
        p = torch.softmax(self._tokens(f), dim=-1)
        labels = torch.where(y == self.ignore_index, 0, y)
        g = minus_one_hot(p, labels)
        return (g * self._mask(y, p)).flatten(-2)

    def sqrt_output_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """Block-diagonal square root of Λ, `(B, T·C, T·K)`.

        The token blocks are :func:`softmax_hessian_sqrt` (``K = C - 1`` for ``C ≥ 2``), zero
        for ignored tokens.
        """
        B = f.shape[0]
        p = torch.softmax(self._tokens(f), dim=-1)  # (B, T, C)
        T, C = p.shape[1], self.classes
        blocks = softmax_hessian_sqrt(p) * self._mask(y, p).unsqueeze(-1)  # (B, T, C, K)
        K = blocks.shape[-1]
        diag = torch.eye(T, dtype=f.dtype, device=f.device)
        return torch.einsum("btcd,ts->btcsd", blocks, diag).reshape(B, T * C, T * K)

    def output_hessian(self, f: Tensor, y: Tensor | None = None) -> Tensor:
        """Λ per sequence, dense `(B, T·C, T·C)` (for references and small sizes)."""
        S = self.sqrt_output_hessian(f, y)
        return S @ S.mT

    def output_hessian_matmul(self, f: Tensor, v: Tensor, y: Tensor | None = None) -> Tensor:
        """Λ applied per sequence: ``v`` `(B, T·C)` or `(k, B, T·C)` → same shape."""
        p = torch.softmax(self._tokens(f), dim=-1)
        vt = self._tokens(v)
        out = (p * vt - p * (p * vt).sum(-1, keepdim=True)) * self._mask(y, p)
        return out.flatten(-2)

    def sampled_sqrt_output_hessian(
        self, f: Tensor, num_samples: int, generator: torch.Generator | None,
        y: Tensor | None = None,
    ) -> Tensor:
        r"""Monte-Carlo square root of Λ, `(B, T·C, num_samples)`.

        Each column is the output gradient of the whole sequence at labels drawn for every
        token from the model's predictive, over :math:`\sqrt{K}`: tokens are independent, so
        cross-token terms vanish in expectation and ``S @ S.mT`` is an unbiased estimate of the
        block-diagonal Λ with ``K`` backward passes per sequence, not ``T·K``.
        """
        B = f.shape[0]
        sample_device = generator.device if generator is not None else f.device
        p = torch.softmax(self._tokens(f.detach().to(sample_device)), dim=-1)  # (B, T, C)
        T, C = p.shape[1], self.classes
        labels = sample_categorical(p.reshape(B * T, C), num_samples,
                                    generator).reshape(B, T, num_samples)
        g = minus_one_hot(p.unsqueeze(2), labels).to(f.device)  # (B, T, K, C)
        if num_samples > 1:
            g = g / math.sqrt(num_samples)
        if y is not None:
            g = g * self._mask(y, f).unsqueeze(-1)
        return g.permute(0, 1, 3, 2).reshape(B, T * C, num_samples)
