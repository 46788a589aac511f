"""Element access of a data-set operator costs one product per row or column asked for."""

from __future__ import annotations

import linear_operator
import torch

import curvop

from cases import register

F64 = torch.float64


def _dataset_op():
    torch.manual_seed(0)
    model = register(torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                                         torch.nn.Linear(7, 3)).double())
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 5, generator=g, dtype=F64)
    Y = torch.randint(0, 3, (24,), generator=g)
    loader = [(X[i: i + 8], Y[i: i + 8]) for i in range(0, 24, 8)]
    return curvop.TorchGGN(model, "classification").dataset_operator(loader)


def _count(monkeypatch):
    """Count product columns of every DatasetLinearOperator (linear_operator rebuilds the
    operator from its representation, so the class is patched, not the instance)."""
    from curvop.operators.dataset import DatasetLinearOperator

    calls = {"columns": 0}
    inner = DatasetLinearOperator._matmul

    def counted(self, rhs):
        calls["columns"] += 1 if rhs.dim() == 1 else rhs.shape[-1]
        return inner(self, rhs)

    monkeypatch.setattr(DatasetLinearOperator, "_matmul", counted)
    return calls


def test_rows_and_entries_by_products(monkeypatch):
    op = _dataset_op()
    H = op.to_dense()
    P = H.shape[0]
    calls = _count(monkeypatch)
    perm = torch.randperm(P, generator=torch.Generator().manual_seed(1))
    # a whole (permuted) row, as linear_operator's pivoted Cholesky asks: one product
    row = op[torch.tensor([7]).unsqueeze(-1), perm.unsqueeze(0)].to_dense()
    torch.testing.assert_close(row, H[7, perm].unsqueeze(0), rtol=1e-12, atol=1e-12)
    assert calls["columns"] == 1
    calls["columns"] = 0
    col = op[perm.unsqueeze(-1), torch.tensor([3]).unsqueeze(0)].to_dense()
    torch.testing.assert_close(col, H[perm, 3].unsqueeze(-1), rtol=1e-12, atol=1e-12)
    assert calls["columns"] == 1
    calls["columns"] = 0
    r, c = torch.tensor([0, 5, 5, 9]), torch.tensor([2, 2, 4, 2])
    torch.testing.assert_close(op._get_indices(r, c), H[r, c], rtol=1e-12, atol=1e-12)
    assert calls["columns"] == 2  # distinct columns {2, 4} < distinct rows {0, 5, 9}


def test_linear_operator_default_preconditioned_logdet_runs_on_a_data_set(monkeypatch):
    op = _dataset_op()
    H = op.to_dense()
    P = H.shape[0]
    calls = _count(monkeypatch)
    exact = torch.linalg.slogdet(H + torch.eye(P, dtype=F64))[1]
    with torch.no_grad(), linear_operator.settings.max_cholesky_size(0), \
            linear_operator.settings.min_preconditioning_size(1), \
            linear_operator.settings.max_preconditioner_size(15):
        val = op.add_diagonal(torch.tensor(1.0, dtype=F64)).logdet()
    # the pivoted Cholesky of rank 15 costs about 15 products, not P per pivot (15 P in all);
    # the rest is linear_operator's CG / Lanczos on its 10 probes
    assert 0 < calls["columns"] < 5 * P
    # linear_operator's stochastic estimate: rough (curvop.linalg has the exact value)
    assert abs(float(val - exact)) <= 0.5 * abs(float(exact))
