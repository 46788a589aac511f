"""Model-backed operators: products, to_dense, diagonal against dense references; the
LinearOperator contract (linear_operator's own test suite); routines and errors."""

from __future__ import annotations

import math
import unittest

import linear_operator
import pytest
import torch
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase

import curvop
from curvop.errors import NotSupportedError

import reference as ref
from cases import Case, cases, register

KINDS = {"ggn": curvop.TorchGGN, "ef": curvop.TorchEF, "hessian": curvop.TorchHessian}
OPTIONS = ["all", "last_layer", "subnet"]


def _build(case, kind, option):
    model, x, y = case.build()
    last = option == "last_layer"
    P = sum(p.numel() for p in ref.selected_params(model, last))
    idx = torch.randperm(P, generator=torch.Generator().manual_seed(2))[: P // 2] \
        if option == "subnet" else None
    iface = KINDS[kind](model, case.likelihood, last_layer=last, subnetwork_indices=idx)
    H = ref.CURVATURES[kind](model, x, y, case.likelihood, last)
    if idx is not None:
        H = H[idx][:, idx]
    return iface, x, y, H


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_products_dense_diagonal(case, kind, option):
    iface, x, y, H = _build(case, kind, option)
    loss, op = iface.full_operator(x, y)
    torch.testing.assert_close(loss, iface.full(x, y)[0])
    P = H.shape[0]
    assert op.shape == (P, P) and op.dtype == case.dtype
    g = torch.Generator().manual_seed(0)
    v = torch.randn(P, generator=g, dtype=case.dtype).to(x.device)
    V = torch.randn(P, 4, generator=g, dtype=case.dtype).to(x.device)
    W = torch.randn(2, P, 3, generator=g, dtype=case.dtype).to(x.device)
    tol = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(op @ v, H @ v, **tol)
    torch.testing.assert_close(op @ V, H @ V, **tol)
    torch.testing.assert_close(op.matmul(W), H @ W, **tol)
    torch.testing.assert_close(op.to_dense(), H, **tol)
    torch.testing.assert_close(op.diagonal(), H.diagonal(), **tol)
    torch.testing.assert_close(op @ v, op @ v, rtol=0, atol=0)  # cached: repeatable


def test_mc_fisher_operator_is_fixed_and_matches_interface():
    model, x, y = Case("tanh_mlp", "classification").build()
    iface = curvop.TorchGGN(model, "classification", stochastic=True, num_samples=3,
                            generator=torch.Generator().manual_seed(5))
    _, op = iface.full_operator(x, y)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op @ v, op @ v, rtol=0, atol=0)
    same = curvop.TorchGGN(model, "classification", stochastic=True, num_samples=3,
                           generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(op.to_dense(), same.full(x, y)[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.diagonal(), op.to_dense().diagonal(), rtol=1e-10, atol=1e-12)


def test_diag_operator():
    model, x, y = Case("cnn", "regression").build()
    iface = curvop.TorchGGN(model, "regression")
    loss, D = iface.diag_operator(x, y)
    assert isinstance(D, linear_operator.operators.DiagLinearOperator)
    torch.testing.assert_close(D.diagonal(), iface.diag(x, y)[1])


def test_wrong_vectors_raise():
    model, x, y = Case("tanh_mlp", "classification").build()
    _, op = curvop.TorchGGN(model, "classification").full_operator(x, y)
    P = op.shape[0]
    with pytest.raises(ValueError, match=f"must have {P} rows"):
        op @ torch.zeros(P + 1, dtype=torch.float64)
    with pytest.raises(TypeError, match="must have the operator's dtype torch.float64"):
        op @ torch.zeros(P)
    with pytest.raises(ValueError, match="must have .* rows"):
        op @ torch.zeros(3, P, dtype=torch.float64)


def test_batch_hooks_raise_clearly():
    model, x, y = Case("tanh_mlp", "classification").build()
    _, op = curvop.TorchGGN(model, "classification").full_operator(x, y)
    with pytest.raises(NotSupportedError, match="has no batch dimensions"):
        op.unsqueeze(0)
    with pytest.raises(NotSupportedError, match="has no batch dimensions"):
        op.expand(2, *op.shape)
    sub = op[torch.tensor([0, 3]), :][:, torch.tensor([0, 3])].to_dense()
    torch.testing.assert_close(sub, op.to_dense()[[0, 3]][:, [0, 3]])


def test_to_dtype_round_trip_leaves_model_alone():
    model, x, y = Case("tanh_mlp", "regression", dtype=torch.float32).build()
    _, op = curvop.TorchGGN(model, "regression").full_operator(x, y)
    op64 = op.to(torch.float64)
    assert op64.dtype == torch.float64
    torch.testing.assert_close(op64.to_dense(), op.to_dense().double(), rtol=1e-5, atol=1e-5)
    assert next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(op.detach().to_dense(), op.to_dense())


# --- lean layers: conv / layer_norm / eval batch_norm with a JVP as their second backward ---

class _Conv1dNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=1)
        self.c2 = torch.nn.Conv1d(4, 4, 2, groups=2, padding="same", bias=False)
        self.ln = torch.nn.LayerNorm(4, elementwise_affine=False)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x.view(-1, 2, 8)))
        h = self.ln(torch.tanh(self.c2(h)).transpose(1, 2))  # padding='same': torch's own conv
        return self.head(h.flatten(1))


def _lean_models():
    nn = torch.nn
    return {
        # stride, dilation, groups, no bias, tuple padding, circular padding, eval BatchNorm2d
        "conv2d": nn.Sequential(
            nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 4, 3, stride=(1, 2), padding=(1, 2),
                                                  dilation=(2, 1)),
            nn.BatchNorm2d(4), nn.Tanh(),
            nn.Conv2d(4, 4, 2, groups=2, bias=False, padding=1, padding_mode="circular"),
            nn.Sigmoid(), nn.Flatten(), nn.LazyLinear(3)),
        "conv1d_ln": _Conv1dNet(),
        "conv3d": nn.Sequential(nn.Unflatten(1, (1, 2, 2, 4)), nn.Conv3d(1, 3, 2, padding=1),
                                nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)),
        # LayerNorm over two dimensions, without bias; BatchNorm1d without affine parameters
        "layernorm2d": nn.Sequential(nn.Unflatten(1, (4, 4)), nn.LayerNorm((4, 4), bias=False),
                                     nn.Flatten(), nn.Linear(16, 5), nn.BatchNorm1d(5,
                                     affine=False), nn.Tanh(), nn.Linear(5, 3)),
    }


def _graph_nodes(t):
    names, seen, todo = set(), set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("name", list(_lean_models()))
def test_lean_layers_products_match_dense(name):
    """GGN/EF/MC-Fisher products through the lean layers equal the dense float64 references,
    for one column and for batched columns, and the cached graph really uses them; the
    Hessian (which needs every second derivative) does not."""
    torch.manual_seed(0)
    model = _lean_models()[name].double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    model(x)  # materialise lazy layers
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
    model.eval()
    register(model)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=g,
                    dtype=torch.float64)
    tol = {"rtol": 1e-10, "atol": 1e-10}
    for kind in ("ggn", "ef"):
        _, op = KINDS[kind](model, "classification").full_operator(x, y)
        H = ref.CURVATURES[kind](model, x, y, "classification")
        torch.testing.assert_close(op @ V[:, 0], H @ V[:, 0], **tol)
        torch.testing.assert_close(op @ V, H @ V, **tol)
        assert op.products.mode == "reverse"
        assert "_LeanOpBackward" in _graph_nodes(op.products.f)
    # the Hessian: one reference HVP (double backward of torch's own layers)
    _, op = KINDS["hessian"](model, "classification").full_operator(x, y)
    params = list(model.parameters())
    grads = torch.autograd.grad(ref.loss_fn("classification", model(x), y), params,
                                create_graph=True)
    vs = [c.view_as(p) for c, p in zip(V[:, 0].split([p.numel() for p in params]), params)]
    hv = torch.autograd.grad(grads, params, vs)
    torch.testing.assert_close(op @ V[:, 0], torch.cat([h.flatten() for h in hv]), **tol)
    assert not any("Lean" in n for n in _graph_nodes(op.products.g[0][1]))
    mc = curvop.TorchGGN(model, "classification", stochastic=True, num_samples=2,
                         generator=torch.Generator().manual_seed(3))
    _, op = mc.full_operator(x, y)
    torch.testing.assert_close(op @ V, op.to_dense() @ V, **tol)  # to_dense: per-sample VJPs


def test_lean_layers_keep_the_cotangent_path_only():
    """The cached graph of a lean convolution yields exact J v (its JVP), and the lean layers
    are only active while that graph is recorded (a plain forward afterwards is torch's)."""
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3, padding=1), torch.nn.Flatten(),
                                torch.nn.Linear(24, 2)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 8, generator=g, dtype=torch.float64)
    y = torch.randn(4, 2, generator=g, dtype=torch.float64)
    register(model)
    _, op = curvop.TorchGGN(model, "regression").full_operator(x, y)
    pr = op.products
    v = torch.randn(op.shape[0], generator=g, dtype=torch.float64)
    J, _ = ref.jacobians(model, x.flatten(1).view(4, 2, 8))
    JV = pr._jv(pr.batch.unflat_columns(v[None]))[0]
    torch.testing.assert_close(JV, J @ v, rtol=1e-12, atol=1e-12)
    out = model(x)
    assert "_LeanOpBackward" not in _graph_nodes(out)


# the iterative path of the GGN and Hessian runs hundreds of CG steps: behind `slow`, the EF
# keeps the iterative path in the default run
ROUTINE_CASES = [(c, k) for c in (False, True) for k in KINDS]
ROUTINE_MARKS = [pytest.param(c, k, marks=[pytest.mark.slow] if not c and k != "ef" else [])
                 for c, k in ROUTINE_CASES]


@pytest.mark.parametrize("cholesky,kind", ROUTINE_MARKS)
def test_linear_operator_routines_after_damping(kind, cholesky):
    model, x, y = Case("mlp_nobias", "classification").build()
    _, op = KINDS[kind](model, "classification").full_operator(x, y)
    H = op.to_dense()
    delta = 1.0 + max(0.0, -float(torch.linalg.eigvalsh(H).min()))
    A = op.add_diagonal(torch.tensor(delta, dtype=torch.float64))
    dense = H + delta * torch.eye(H.shape[0], dtype=torch.float64)
    rhs = torch.randn(H.shape[0], 2, dtype=torch.float64)
    size = math.inf if cholesky else 0
    for precond in (0, 15):
        with linear_operator.settings.max_cholesky_size(size), \
                linear_operator.settings.max_preconditioner_size(precond), \
                linear_operator.settings.min_preconditioning_size(1), \
                linear_operator.settings.cg_tolerance(1e-6), \
                linear_operator.settings.max_cg_iterations(300), \
                linear_operator.settings.max_root_decomposition_size(2 * H.shape[0]):
            # linear_operator's CG stops short of its tolerance setting (its residual test is
            # loose): 1e-3 relative is what its iterative path delivers, exact with Cholesky
            tol = {"rtol": 1e-8, "atol": 1e-10} if cholesky else {"rtol": 1e-3, "atol": 1e-6}
            sol = linear_operator.solve(A, rhs)
            torch.testing.assert_close(sol, torch.linalg.solve(dense, rhs), **tol)
            inv_quad, logdet = A.inv_quad_logdet(rhs, logdet=True)
            exact = torch.linalg.slogdet(dense)[1]
            torch.testing.assert_close(inv_quad, (rhs * torch.linalg.solve(dense, rhs)).sum(),
                                       **tol)
            # the iterative path's logdet is linear_operator's stochastic Lanczos quadrature with
            # its default 10 probes: a rough estimate (curvop.linalg has exact ones)
            assert abs(float(logdet - exact)) <= (1e-8 if cholesky else 0.5 * abs(float(exact)))
            R = A.root_decomposition().root.to_dense()
            if cholesky:
                torch.testing.assert_close(R @ R.T, dense, rtol=1e-6, atol=1e-6)
            else:  # Lanczos: exact on its Krylov space only (rank <= distinct eigenvalues)
                assert float((R @ R.T).trace()) <= float(dense.trace()) * (1 + 1e-6)
                Q = torch.linalg.qr(R).Q
                torch.testing.assert_close(Q.T @ (R @ R.T) @ Q, Q.T @ dense @ Q, rtol=1e-4,
                                           atol=1e-4)


# --- linear_operator's own test suite ---------------------------------------------------

def _full_rank_problem(kind):
    torch.manual_seed(0)
    # float32, as linear_operator's suite draws its right-hand sides in the default dtype
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(),
                                torch.nn.Linear(3, 2)).eval()
    x = torch.randn(40, 3)
    y = torch.randn(40, 2)
    register(model)
    return KINDS[kind](model, "regression").full_operator(x, y)[1]


class _OperatorSuite(LinearOperatorTestCase):
    kind = "ggn"
    seed = 0
    should_test_sample = False

    def create_linear_op(self):
        op = _full_rank_problem(self.kind)
        return op.add_diagonal(torch.tensor(0.5))

    def evaluate_linear_op(self, linear_op):
        return linear_op.to_dense()

    def _assert_no_batch(self, fn):
        with pytest.raises(NotSupportedError, match="has no batch dimensions"):
            fn(self.create_linear_op()._linear_op)

    # batch dimensions do not exist for a curvature: each batch test asserts the clear error
    def test_expand(self):
        self._assert_no_batch(lambda op: op._expand_batch((2,)))

    def test_permute(self):
        self._assert_no_batch(lambda op: op._permute_batch(0))

    def test_squeeze_unsqueeze(self):
        self._assert_no_batch(lambda op: op.unsqueeze(0))

    def test_sum(self):
        self._assert_no_batch(lambda op: op._sum_batch(0))

    def test_prod(self):
        self._assert_no_batch(lambda op: op._prod_batch(0))

    def test_transpose_batch(self):
        self._assert_no_batch(lambda op: op.unsqueeze(0))

    def test_add(self):
        op = self.create_linear_op()
        rhs = torch.randn(*op.shape)
        torch.testing.assert_close((op + rhs).to_dense(), op.to_dense() + rhs)
        self._assert_no_batch(lambda o: o + torch.randn(2, *o.shape))

    def test_reshape(self):
        self._assert_no_batch(lambda op: op.reshape(1, *op.shape))

    def test_cat_rows(self):  # linear_operator's cat_rows builds batched blocks
        self._assert_no_batch(lambda op: op._expand_batch((2,)))

    def test_half(self):  # the model has no half precision weights to run in
        op = self.create_linear_op()
        assert op.half().dtype == torch.float16

    def test_bilinear_derivative(self):  # no gradient reaches the parameters
        op = _full_rank_problem(self.kind)
        v = torch.randn(op.shape[0], 1)
        assert op._bilinear_derivative(v, v) == (None,) * len(op.representation())


class TestGGNOperatorSuite(_OperatorSuite, unittest.TestCase):
    kind = "ggn"


class TestEFOperatorSuite(_OperatorSuite, unittest.TestCase):
    kind = "ef"


# --- scipy --------------------------------------------------------------------------------

def test_to_scipy_eigsh_cg_minres_lobpcg():
    import numpy as np
    import scipy.sparse.linalg as sla

    model, x, y = Case("cnn", "classification").build()
    _, op = curvop.TorchGGN(model, "classification").full_operator(x, y)
    H = op.to_dense().numpy()
    A = curvop.to_scipy(op)
    assert A.shape == H.shape and A.dtype == np.float64
    vals, vecs = sla.eigsh(A, k=3, which="LA", tol=1e-12)
    exact = np.linalg.eigvalsh(H)[::-1][:3]
    np.testing.assert_allclose(np.sort(vals)[::-1], exact, rtol=1e-8)
    for i in range(3):  # eigenvectors up to sign
        np.testing.assert_allclose(H @ vecs[:, i], vals[i] * vecs[:, i], atol=1e-8)
    damped = curvop.to_scipy(op.add_diagonal(torch.tensor(0.1, dtype=torch.float64)))
    b = np.random.default_rng(0).standard_normal(H.shape[0])
    ref_sol = np.linalg.solve(H + 0.1 * np.eye(H.shape[0]), b)
    for solver in (sla.cg, sla.minres):
        sol, info = solver(damped, b, rtol=1e-12, maxiter=5000)
        assert info == 0
        np.testing.assert_allclose(sol, ref_sol, rtol=1e-6, atol=1e-8)
    X0 = np.random.default_rng(1).standard_normal((H.shape[0], 2))
    lv, _ = sla.lobpcg(A, X0, tol=1e-9, maxiter=500, largest=True)
    np.testing.assert_allclose(np.sort(lv)[::-1], exact[:2], rtol=1e-5)
    f32 = curvop.to_scipy(op, dtype=np.float32)
    assert f32.dtype == np.float32 and f32.matvec(b.astype(np.float32)).dtype == np.float32


def test_to_scipy_errors():
    with pytest.raises(TypeError, match="`op` must be a linear_operator.LinearOperator"):
        curvop.to_scipy([[1.0]])
    with pytest.raises(ValueError, match=r"`op` must be a square 2-D \(P, P\) operator"):
        curvop.to_scipy(torch.zeros(2, 3))


@pytest.mark.gpu
def test_to_scipy_on_cuda():
    import numpy as np

    model, x, y = Case("tanh_mlp", "regression", device="cuda").build()
    _, op = curvop.TorchGGN(model, "regression").full_operator(x, y)
    A = curvop.to_scipy(op)
    v = np.ones(op.shape[0])
    np.testing.assert_allclose(A.matvec(v), op.to_dense().cpu().numpy() @ v, rtol=1e-10)
