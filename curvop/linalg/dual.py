r"""The data-space dual: exact ``logdet`` and ``solve`` of :math:`G + \delta I` when ``R < P``.

Both go through an ``R × R`` Gram matrix, ``R = N·K`` the number of rows of the square root.

A GGN, MC Fisher or empirical Fisher (one batch, or summed over a data set) is
:math:`G = \sum_n J_n^\top S_n S_n^\top J_n = M^\top M` with the ``R`` rows of ``M`` `(R, P)` the
per-sample products :math:`S_n^\top J_n`. With the Gram matrix :math:`W = M M^\top` `(R, R)`:

.. math::

    \log\det(\delta I_P + M^\top M) = (P - R) \log\delta + \log\det(\delta I_R + W),

    (\delta I_P + M^\top M)^{-1} b = \frac{1}{\delta}\bigl(b - M^\top(\delta I_R + W)^{-1} M b\bigr)

(matrix determinant lemma and Woodbury). Nothing `P × P` is formed: ``W`` is assembled from
per-sample products (in row panels that fit ``memory_budget``, never all of ``M`` unless it
fits), and ``M b`` / ``Mᵀ y`` are one Jacobian-vector / vector-Jacobian pass over the data.

Two refinements keep ``R`` and the cost down:

* ``S_n`` `(C, K)` is compressed to its numerical rank (``S_n S_nᵀ`` unchanged): the
  classification Λ has rank ``C - 1``, so ``R = N (C - 1)``;
* for networks of ``nn.Linear`` layers (no weight sharing) ``W`` comes in closed form from the
  layer inputs ``a`` and backpropagated columns ``g`` (Goodfellow's per-example trick):
  :math:`W_{(n,k),(m,l)} = \sum_{\text{layers}} (a_n^\top a_m + [\text{bias}])\, g_{nk}^\top
  g_{ml}`, costing :math:`O(R^2 \sum O_\ell)` instead of :math:`O(R^2 P)`.

A single ``δ`` takes a Cholesky factor of :math:`W + \delta I`. A grid of ``δ`` first reduces
``W`` to band form by an orthogonal similarity, :math:`W = Q B Q^\top`
(``curvop.linalg._band``: about 3.7 Cholesky factorisations' worth of matrix products, where
``eigvalsh`` costs 4.3–5.2); every ``δ`` is then a banded Cholesky factorisation of
:math:`B + \delta I` (:math:`O(R b^2)`) and every solve two applications of ``Q``
(:math:`O(R^2)` per right-hand side). All factorisations run in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from curvop import _checks
from curvop.errors import InputError
from curvop.linalg._band import BandReduction

__all__ = ["DataSpaceDual", "DualFactorization", "sqrt_form_batches"]

_DEFAULT_BUDGET = 1 << 30


def sqrt_form_batches(op) -> Callable[[], Iterator] | None:
    """A factory of iterators over the per-batch square-root-form operators of ``op``.

    ``GGNLinearOperator`` (GGN, MC Fisher, EF) gives itself; a ``DatasetLinearOperator`` whose
    batches are of that form gives its batches (streamed, data order checked). Anything else
    gives ``None``.
    """
    from curvop.operators.dataset import DatasetLinearOperator
    from curvop.operators.ggn import GGNLinearOperator

    if isinstance(op, GGNLinearOperator):
        return lambda: iter([op])
    if isinstance(op, DatasetLinearOperator):
        entries = op._state.get("batches") or []
        if entries and all(e.get("S") is not None for e in entries):
            return op._ops
    return None


def _compress(S: Tensor) -> tuple[Tensor, int]:
    """``S`` `(B, C, K)` → ``U Σ`` `(B, C, K)` (columns by decreasing σ) and the largest rank.

    A column is numerically zero when ``σ ≤ max(C, K) · eps(dtype) · σ_max`` of its sample.
    """
    B, C, K = S.shape
    U, sig, _ = torch.linalg.svd(S.detach().double(), full_matrices=False)
    tol = max(C, K) * torch.finfo(S.dtype).eps * sig[:, :1]
    rank = int((sig > tol).sum(-1).max()) if B else 0
    return (U * sig.unsqueeze(-2)).to(S.dtype), rank


class DataSpaceDual:
    r"""``M`` `(R, P)` of a curvature :math:`G = M^\top M`, seen through products and its Gram.

    Args:
        op: A ``GGNLinearOperator`` (GGN, MC Fisher, EF) or a ``DatasetLinearOperator`` of them
            (see :func:`sqrt_form_batches`), or a tensor ``M`` `(R, P)` (e.g. the transposed
            root of a low-rank operator).
        compress: Compress each ``S_n`` to its numerical rank (fewer rows, same ``G``).
        memory_budget: Bytes of per-sample rows held at once while assembling the Gram matrix
            (default 1 GiB); the `(R, R)` Gram matrix itself must fit the free memory.

    Raises:
        InputError: If ``op`` has no square-root form.
    """

    def __init__(self, op, *, compress: bool = True, memory_budget: int | None = None) -> None:
        self.budget = int(memory_budget or _DEFAULT_BUDGET)
        self._explicit: Tensor | None = None
        if isinstance(op, Tensor):
            if op.dim() != 2:
                raise InputError(f"`M` must be a (R, P) matrix; got {tuple(op.shape)}")
            self._explicit = op.detach()
            self.num_rows, self.size = op.shape
            self.dtype, self.device = op.dtype, op.device
            return
        factory = sqrt_form_batches(op)
        if factory is None:
            raise InputError(f"{type(op).__name__} has no square-root form J^T S S^T J; the "
                             "data-space dual needs a GGN, MC Fisher or EF operator")
        self.op, self._ops = op, factory
        self.size, self.dtype, self.device = op.shape[-1], op.dtype, op.device
        Ss = [o._S for o in self._entries()]
        if compress:
            pairs = [_compress(S) for S in Ss]
            K = max(r for _, r in pairs)
            K_full = max(S.shape[-1] for S in Ss)
            if K < K_full:
                Ss = [Sc[..., :K] for Sc, _ in pairs]
        K = max(S.shape[-1] for S in Ss)
        # batches of lower rank get zero columns: zero rows of M change neither G nor the result
        self._S = [torch.nn.functional.pad(S, (0, K - S.shape[-1])).to(self.dtype) for S in Ss]
        self.K = K
        self.num_rows = sum(S.shape[0] for S in self._S) * K

    def _entries(self):
        """Per-batch operators without a data pass where they are at hand (first-pass S)."""
        from curvop.operators.dataset import DatasetLinearOperator

        if isinstance(self.op, DatasetLinearOperator):
            return [type("E", (), {"_S": e["S"]}) for e in self.op._state["batches"]]
        return [self.op]

    # ------------------------------------------------------------------ products
    @torch.no_grad()
    def matvec(self, V: Tensor) -> Tensor:
        """``M V`` `(R, m)` for ``V`` `(P, m)`: one Jacobian-vector pass over the data.

        Args:
            V: `(P, m)` vectors in parameter space.

        Returns:
            :math:`M V` `(R, m)`, rows ordered by sample, then by root column ``k``.
        """
        if self._explicit is not None:
            return self._explicit @ V.to(self.dtype)
        out = []
        for o, S in zip(self._ops(), self._S):
            b = o._batch
            JV = o.products._jv(b.unflat_columns(V.T.to(self.dtype)))  # (m, B, C)
            out.append(torch.einsum("bck,mbc->bkm", S, JV).reshape(-1, V.shape[1]))
        return torch.cat(out)

    @torch.no_grad()
    def rmatvec(self, Y: Tensor) -> Tensor:
        r"""``Mᵀ Y`` `(P, m)` for ``Y`` `(R, m)`: one vector-Jacobian pass over the data.

        Args:
            Y: `(R, m)` vectors in data space (ordered as :meth:`matvec`'s rows).

        Returns:
            :math:`M^\top Y` `(P, m)`.
        """
        if self._explicit is not None:
            return self._explicit.mT @ Y.to(self.dtype)
        total, start = None, 0
        for o, S in zip(self._ops(), self._S):
            b = o._batch
            rows = S.shape[0] * self.K
            Yb = Y[start: start + rows].to(self.dtype).reshape(S.shape[0], self.K, -1)
            start += rows
            U = torch.einsum("bck,bkm->mbc", S, Yb)
            part = b.flat(o.products._jtu(U), 1).T
            total = part if total is None else total + part
        return total

    # ------------------------------------------------------------------ Gram matrix
    @torch.no_grad()
    def gram(self) -> Tensor:
        r"""The Gram matrix ``W = M Mᵀ`` `(R, R)` in float64.

        Returns:
            :math:`W = M M^\top` `(R, R)`, float64, on the operator's device.

        Raises:
            MemoryBudgetError: If `(R, R)` float64 does not fit the free memory.
        """
        R = self.num_rows
        _checks.check_fits((R, R), torch.float64, self.device, "the data-space Gram matrix")
        if self._explicit is not None:
            M = self._explicit.double()
            return M @ M.mT
        W = self._tap_gram()
        return W if W is not None else self._row_gram()

    def _tap_gram(self) -> Tensor | None:
        """Closed form for networks of ``nn.Linear`` layers, or None where it does not apply."""
        from curvop._model_guard import model_guard
        from curvop._taps import tap_layers

        layers: list[list[tuple[Tensor, Tensor]]] = []
        bias: list[bool] = []
        held = 0
        verified: set = set()  # the taps' numerical check runs on the first batch only
        for o, S in zip(self._ops(), self._S):
            b = o._batch
            if b.sel.index is not None:
                return None
            with model_guard(b.fm.module):
                taps = tap_layers(b, S, verified)
            if taps is None or any(t.a.shape[1] != 1 or t.a.shape[2] != 1 for t in taps):
                return None
            if not layers:
                layers, bias = [[] for _ in taps], [t.has_bias for t in taps]
            for i, t in enumerate(taps):
                a = t.a[:, 0, 0].double()  # (n, I)
                g = t.g[:, :, 0, 0].permute(1, 0, 2).double()  # (n, K, O)
                layers[i].append((a, g))
                held += (a.numel() + g.numel()) * 8
            if held > self.budget:
                return None
        R, K = self.num_rows, self.K
        N = R // K
        W = torch.zeros(R, R, dtype=torch.float64, device=self.device)
        chunk = max(1, min(N, self.budget // max(1, 16 * R * K)))
        for parts, has_bias in zip(layers, bias):
            A = torch.cat([a for a, _ in parts])  # (N, I)
            Gr = torch.cat([g for _, g in parts]).reshape(R, -1)  # (R, O)
            for s in range(0, N, chunk):  # lower block triangle only: half the flops
                e = min(N, s + chunk)
                AA = A[s:e] @ A[:e].mT
                if has_bias:
                    AA += 1.0
                blk = (Gr[s * K: e * K] @ Gr[: e * K].mT).view(e - s, K, e, K)
                blk.mul_(AA[:, None, :, None])
                W[s * K: e * K, : e * K] += blk.view((e - s) * K, e * K)
        for s in range(0, N, chunk):  # mirror the strict upper block triangle
            e = min(N, s + chunk)
            W[s * K: e * K, e * K:] = W[e * K:, s * K: e * K].mT
        return W

    def _row_blocks(self) -> list[tuple[int, slice, int]]:
        """``(batch, sample slice, rows)`` blocks of per-sample rows that fit the budget."""
        per_sample = self.K * self.size * 8
        n = max(1, self.budget // (4 * per_sample))
        blocks = []
        for i, S in enumerate(self._S):
            for s in range(0, S.shape[0], n):
                e = min(S.shape[0], s + n)
                blocks.append((i, slice(s, e), (e - s) * self.K))
        return blocks

    def _row_gram(self) -> Tensor:
        """``W`` from per-sample rows ``S_nᵀ J_n``, in panels; recomputes panels, holds two."""
        from curvop._model_guard import model_guard

        ops = list(self._ops())

        def rows(block) -> Tensor:
            i, sl, _ = block
            b = ops[i]._batch
            with model_guard(b.fm.module):
                M = b.sqrt_vjps(sl, self._S[i][sl])  # (n, K, P)
            return M.reshape(-1, self.size).double()

        blocks = self._row_blocks()
        panel_rows = max(1, self.budget // (2 * self.size * 8))
        panels, cur, count = [], [], 0
        for blk in blocks:
            if cur and count + blk[2] > panel_rows:
                panels.append(cur)
                cur, count = [], 0
            cur.append(blk)
            count += blk[2]
        panels.append(cur)
        starts = [0]
        for p in panels:
            starts.append(starts[-1] + sum(b[2] for b in p))
        R = self.num_rows
        W = torch.empty(R, R, dtype=torch.float64, device=self.device)
        for i, pi in enumerate(panels):
            Mi = torch.cat([rows(b) for b in pi])
            si = slice(starts[i], starts[i + 1])
            W[si, si] = Mi @ Mi.mT
            for j in range(i + 1, len(panels)):
                Mj = torch.cat([rows(b) for b in panels[j]])
                sj = slice(starts[j], starts[j + 1])
                W[si, sj] = Mi @ Mj.mT
                W[sj, si] = W[si, sj].mT
        return W


class DualFactorization:
    r"""Factorise :math:`W = M M^\top` once: ``logdet``, ``solve`` of :math:`M^\top M + \delta I`.

    Args:
        dual: The :class:`DataSpaceDual`.
        method: ``'auto'`` (a Cholesky factor per ``δ`` until a grid of three or more ``δ`` is
            asked for, then the band form for every later ``δ`` and solve), ``'band'``,
            ``'eigh'`` (eigenvalues for ``logdet``, eigenvectors for solves) or ``'cholesky'``
            (a Cholesky factor per ``δ``, the two latest kept).

    Accuracy: exact up to float64 rounding of the Gram matrix and its factorisation (relative
    errors near ``1e-12`` for ``logdet``; for ``solve`` about ``eps · (λ_max / δ)²``, one
    ``refine`` step brings it to ``eps · λ_max / δ``). The band form is an orthogonal
    similarity: backward stable, like the eigendecomposition.

    Cost: the Gram matrix once. Then per ``δ`` one Cholesky factorisation
    (:math:`\tfrac13 R^3` flops) or, after the reduction to band form (:math:`\tfrac43 R^3`
    flops, all in matrix products; on one CPU core at ``R = 9000`` about 3.7 Cholesky
    factorisations against 4.3–5.2 for ``eigvalsh``), a banded one (:math:`O(R b^2)`, ``b =
    96``) and two applications of the orthogonal factor per solve (:math:`O(R^2)` per
    right-hand side). The reduction overwrites ``W`` (no second ``R × R`` matrix);
    :attr:`W` is rebuilt from the data if asked for afterwards.

    Raises:
        InputError: If ``method`` is not one of the four.
    """

    def __init__(self, dual: DataSpaceDual, method: str = "auto") -> None:
        if method not in ("auto", "band", "eigh", "cholesky"):
            raise InputError(f"`method` must be 'auto', 'band', 'eigh' or 'cholesky'; got "
                             f"{method!r}")
        self.dual, self.method = dual, method
        self.size, self.num_rows = dual.size, dual.num_rows
        self._W: Tensor | None = None
        self._evals: Tensor | None = None
        self._evecs: Tensor | None = None
        self._band: BandReduction | None = None
        self._chol: dict[float, Tensor] = {}

    @property
    def W(self) -> Tensor:
        """The Gram matrix (built on first use, and again after the band reduction used it).

        The band reduction overwrites this tensor in place: a reference to it taken before a
        grid of ``δ`` then holds the band form, not ``W``; ``.clone()`` it to keep ``W``.

        Returns:
            `(R, R)` float64.
        """
        if self._W is None:
            self._W = self.dual.gram()
        return self._W

    def band(self) -> BandReduction:
        r"""The band form :math:`W = Q B Q^\top` (computed once, in the storage of ``W``).

        Returns:
            The :class:`~curvop.linalg._band.BandReduction` (banded factorisations per ``δ``,
            solves, eigenvalues).
        """
        if self._band is None:
            W, self._W = self.W, None
            self._band = BandReduction(W)
            self._chol.clear()  # every later δ goes through the band form
        return self._band

    def eigenvalues(self, vectors: bool = False) -> Tensor:
        """Eigenvalues `(R,)` of ``W`` (clamped at 0), ascending; also the nonzero spectrum of G.

        From the band form where it exists (LAPACK's banded eigensolver), else ``eigvalsh``.

        Args:
            vectors: Also compute and keep the eigenvectors (``eigh`` instead of the much
                cheaper ``eigvalsh``), for solves by the eigendecomposition.

        Returns:
            `(R,)` float64, ascending (computed once, then cached).
        """
        if self._evals is None or (vectors and self._evecs is None):
            if vectors:
                lam, V = torch.linalg.eigh(self.W)
                self._evecs = V
            elif self._band is not None:
                lam = self._band.eigenvalues()
            else:
                lam = torch.linalg.eigvalsh(self.W)
            self._evals = lam.clamp_min(0)
        return self._evals

    def _cholesky(self, delta: float) -> Tensor:
        if delta not in self._chol:
            A = self.W.clone()  # W + δI without an (R, R) identity
            A.diagonal().add_(delta)
            L, info = torch.linalg.cholesky_ex(A)
            del A
            if int(info) != 0:
                raise InputError(f"δ = {delta:g}: δI + W is not positive definite")
            if len(self._chol) >= 2:
                self._chol.pop(next(iter(self._chol)))
            self._chol[delta] = L
        return self._chol[delta]

    def _use_band(self, n: int) -> bool:
        return self.method == "band" or (self.method == "auto" and (
            n >= 3 or self._band is not None))

    def _check(self, delta: float) -> None:
        if delta <= 0 and self.size > self.num_rows:
            raise InputError(f"δ must be > 0 (the curvature has rank ≤ {self.num_rows} < P = "
                             f"{self.size}); got {delta:g}")

    def logdet(self, deltas: Tensor) -> Tensor:
        r""":math:`\log\det(M^\top M + \delta I_P)` for each ``δ`` in ``deltas`` `(d,)`, float64.

        .. math::

            \log\det(\delta I_P + M^\top M) = (P - R)\log\delta + \log\det(\delta I_R + W)

        (a Cholesky factor per ``δ`` for one or two ``δ``, the band form for a grid; the
        eigenvalues with ``method='eigh'``, and with ``'auto'`` once they are known, e.g. after
        :meth:`eigenvalues` or a derivative in ``δ``: then each ``δ`` is :math:`O(R)`, the
        eigenvalues clamped at zero, which for a rank-deficient ``W`` and ``δ`` near the
        rounding level of ``W`` shifts the result within float64 accuracy).

        Args:
            deltas: The dampings `(d,)` (float64).

        Returns:
            `(d,)` float64 on the CPU.

        Raises:
            InputError: If ``δ ≤ 0`` while ``R < P``, or :math:`W + \delta I` is not positive
                definite.
        """
        P, R = self.size, self.num_rows
        for d in deltas.tolist():
            self._check(d)
        extra = [(P - R) * math.log(d) if P != R else 0.0 for d in deltas.tolist()]
        if self.method == "eigh" or (self.method == "auto" and self._evals is not None):
            lam = self.eigenvalues()  # O(R) per δ once the spectrum is known
            dl = deltas.to(lam.device)
            if bool((lam.min() + dl <= 0).any()):
                raise InputError("δI + W is not positive definite for some δ")
            return (torch.log(lam.unsqueeze(0) + dl.unsqueeze(1)).sum(1).cpu()
                    + torch.tensor(extra, dtype=torch.float64))
        out = []
        if self._use_band(deltas.numel()):
            band = self.band()
            for d, e in zip(deltas.tolist(), extra):
                val = band.logdet(d)
                if val is None:
                    raise InputError(f"δ = {d:g}: δI + W is not positive definite")
                out.append(val + e)
        else:
            for d, e in zip(deltas.tolist(), extra):
                L = self._cholesky(d)
                out.append(float(2 * torch.log(L.diagonal()).sum()) + e)
        return torch.tensor(out, dtype=torch.float64)

    def _inner_solve(self, Y: Tensor, delta: float) -> Tensor:
        """``(W + δI)⁻¹ Y`` in float64."""
        Y = Y.double()
        if self.method == "eigh":
            lam = self.eigenvalues(vectors=True)
            V = self._evecs
            return V @ ((V.mT @ Y) / (lam + delta).unsqueeze(-1))
        if self._use_band(1):
            X = self.band().solve(Y, delta)
            if X is None:
                raise InputError(f"δ = {delta:g}: δI + W is not positive definite")
            return X
        return torch.cholesky_solve(Y, self._cholesky(delta))

    def solve(self, B: Tensor, delta: float, refine: int = 0) -> Tensor:
        r""":math:`(M^\top M + \delta I)^{-1} B` for ``B`` `(P, m)` (Woodbury), in ``B``'s dtype.

        Args:
            B: Right-hand sides `(P, m)`.
            delta: The damping (``> 0`` when ``R < P``).
            refine: Steps of iterative refinement (each two more passes over the data).

        Returns:
            `(P, m)` in ``B``'s dtype.

        Raises:
            InputError: If ``δ ≤ 0`` while ``R < P``, or :math:`W + \delta I` is not positive
                definite.
        """
        self._check(delta)
        X = self._woodbury(B, delta)
        for _ in range(refine):
            res = B.double() - self.dual.rmatvec(self.dual.matvec(X)).double() - delta * X
            X = X + self._woodbury(res, delta)
        return X.to(B.dtype)

    def _woodbury(self, B: Tensor, delta: float) -> Tensor:
        MB = self.dual.matvec(B).double()
        Y = self._inner_solve(MB, delta)
        return (B.double() - self.dual.rmatvec(Y).double()) / delta
