r"""Hutchinson estimators of the trace and the diagonal, with standard errors.

With Rademacher probes :math:`z_i \in \{\pm 1\}^P` (:math:`\mathbb{E}[z z^\top] = I`):

.. math::

    \operatorname{tr} A \approx \frac{1}{m}\sum_{i=1}^m z_i^\top A z_i, \qquad
    \operatorname{diag} A \approx \frac{1}{m}\sum_{i=1}^m z_i \odot A z_i .

Both are unbiased. Their variances are :math:`2\sum_{j \ne k} A_{jk}^2 / m` (trace) and
:math:`\sum_{k \ne j} A_{jk}^2 / m` per entry ``j`` (diagonal): Rademacher probes are exact for
a diagonal matrix. The standard error reported is the sample standard deviation over the
probes divided by :math:`\sqrt{m}`, so about 95% of seeds give an estimate within two standard
errors. Probes run in blocks (one operator product per block); ``generator`` / ``seed`` make
every result reproducible, independent of the device.
"""

from __future__ import annotations

import torch

from curvop.linalg._common import (
    CountedOperator,
    Estimate,
    check_positive_int,
    rademacher,
    sample_stderr,
)

__all__ = ["hutchinson_trace", "hutchinson_diagonal"]


def _probe_products(op, num_probes: int, block: int | None, generator, seed, size):
    A = CountedOperator(op, 0.0, size)
    num_probes = check_positive_int(num_probes, "num_probes")
    block = num_probes if block is None else check_positive_int(block, "block")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    for start in range(0, num_probes, block):
        m = min(block, num_probes - start)
        Z = rademacher(A.size, m, generator, None, torch.float64, A.device)
        yield Z, A(Z), A


def hutchinson_trace(op, num_probes: int = 100, *, seed: int | None = 0,
                     generator: torch.Generator | None = None, block: int | None = None,
                     size: int | None = None) -> Estimate:
    r"""Hutchinson estimate of :math:`\operatorname{tr} A` with its standard error.

    Args:
        op: A `(P, P)` ``LinearOperator`` or tensor, or a callable on `(P, m)` blocks (then
            pass ``size``).
        num_probes: Rademacher probes `m`.
        seed: Seed of a fresh CPU generator (ignored when ``generator`` is given).
        generator: A CPU ``torch.Generator`` (consumed: successive calls draw new probes).
        block: Probes per operator product (default all at once).
        size: `P` when ``op`` is a callable.

    Returns:
        An :class:`~curvop.linalg.Estimate` (float64 value and stderr).

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> est = hutchinson_trace(A, 4)
        >>> float(est.value), float(est.stderr)   # exact for a diagonal matrix
        (55.0, 0.0)
    """
    samples, spent = [], 0
    for Z, AZ, A in _probe_products(op, num_probes, block, generator, seed, size):
        samples.append((Z * AZ).sum(0))
        spent = A.num_products
    s = torch.cat(samples)
    return Estimate(s.mean(), sample_stderr(s), s.numel(), spent)


def hutchinson_diagonal(op, num_probes: int = 100, *, seed: int | None = 0,
                        generator: torch.Generator | None = None, block: int | None = None,
                        size: int | None = None) -> Estimate:
    r"""Hutchinson estimate of :math:`\operatorname{diag} A` with per-entry standard errors.

    Args:
        op: A `(P, P)` ``LinearOperator`` or tensor, or a callable on `(P, m)` blocks.
        num_probes: Rademacher probes `m`.
        seed: Seed of a fresh CPU generator (ignored when ``generator`` is given).
        generator: A CPU ``torch.Generator``.
        block: Probes per operator product (default all at once).
        size: `P` when ``op`` is a callable.

    Returns:
        An :class:`~curvop.linalg.Estimate` whose ``value`` and ``stderr`` are `(P,)`.
    """
    total = total_sq = None
    m, spent = 0, 0
    for Z, AZ, A in _probe_products(op, num_probes, block, generator, seed, size):
        s = Z * AZ  # (P, b): one sample per column
        total = s.sum(1) if total is None else total + s.sum(1)
        total_sq = s.pow(2).sum(1) if total_sq is None else total_sq + s.pow(2).sum(1)
        m += s.shape[1]
        spent = A.num_products
    mean = total / m
    if m < 2:
        return Estimate(mean, torch.zeros_like(mean), m, spent)
    var = (total_sq - m * mean.pow(2)).clamp_min(0) / (m - 1)
    return Estimate(mean, (var / m).sqrt(), m, spent)
