"""laplace-torch with curvop's backends gives the numbers of laplace-torch's own backends.

Every test fits the same tiny float64 problems (a 3-5-C tanh MLP, 12 points in a DataLoader of
batches 5, 5, 2) once with a laplace-torch backend and once with curvop's, and compares the log
marginal likelihood, the posterior precision, the Kronecker factors and the GLM predictive.
Combinations laplace-torch or curvop reject are data and assert their error.
"""

import functools
import itertools
import runpy
import warnings
from importlib.util import find_spec
from pathlib import Path

import laplace
import pytest
import torch
from laplace.curvature import BackPackEF, BackPackGGN, CurvlinopsEF, CurvlinopsHessian
from laplace.utils.matrix import KronDecomposed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvop.compat import laplace as cl
from curvop.curvature.registry import BACKENDS
from curvop.errors import InputError, InputTypeError, NotSupportedError

from cases import assert_untouched, snapshot

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

LIKELIHOODS = ("regression", "classification")
SUBSETS = ("all", "last_layer", "subnetwork")
STRUCTURES = ("full", "diag", "kron")
KINDS = ("ggn", "ef", "hessian")
OUTPUTS = {"regression": 2, "classification": 3}
PRIOR_PRECISION = 8.0  # > the most negative Hessian eigenvalue of both problems
SUBNET = torch.tensor([0, 3, 7, 20, 30, 31])
RTOL = 1e-5
EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "laplace_marglik.py"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: extra torch threads only contend (and the machine may be shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- problems
def make_model(likelihood):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(),
                         nn.Linear(5, OUTPUTS[likelihood])).double()


@functools.cache
def data(likelihood):
    """Training inputs and targets near the model (regression) or sampled from it."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        f = make_model(likelihood)(X)
    if likelihood == "regression":
        y = f + 0.3 * torch.randn(f.shape, generator=g, dtype=torch.float64)
    else:
        y = torch.multinomial(torch.softmax(3 * f, -1), 1, generator=g).squeeze(1)
    X_test = torch.randn(4, 3, generator=g, dtype=torch.float64)
    return X, y, X_test


def loader(likelihood, batch_size=5):
    X, y, _ = data(likelihood)
    return DataLoader(TensorDataset(X, y), batch_size=batch_size)


def fit(backend, likelihood, subset, structure, **kwargs):
    if subset == "subnetwork":
        kwargs["subnetwork_indices"] = SUBNET
    la = laplace.Laplace(make_model(likelihood), likelihood, subset_of_weights=subset,
                         hessian_structure=structure, backend=backend,
                         prior_precision=PRIOR_PRECISION, **kwargs)
    la.fit(loader(likelihood))
    return la


def dense_precision(la):
    P = la.posterior_precision
    if isinstance(P, KronDecomposed):
        return P.to_matrix()
    if isinstance(P, tuple):  # LowRankLaplace: ((U, eigenvalues), prior diagonal)
        (U, lam), d = P
        return U @ torch.diag(lam) @ U.T + torch.diag(d)
    return torch.diag(P) if P.ndim == 1 else P


def summary(la):
    """What must agree: marginal likelihood, precision, Kron factors, GLM predictive."""
    X_test = data(la.likelihood)[2]
    f_mu, f_var = la._glm_predictive_distribution(X_test)
    out = {"marglik": la.log_marginal_likelihood().detach(), "loss": la.loss,
           "precision": dense_precision(la), "f_mu": f_mu, "f_var": f_var,
           "predictive": la(X_test, pred_type="glm", link_approx="probit")}
    if getattr(la, "H_facs", None) is not None:
        out["kron_factors"] = la.H_facs.kfacs
    return out


def assert_same(ours, theirs, relative_to_max=False):
    """Equal to ``RTOL`` relative per entry (``relative_to_max``: relative to the largest)."""
    assert ours.keys() == theirs.keys()
    for name in theirs:
        atol = 1e-9
        if relative_to_max and isinstance(theirs[name], torch.Tensor):
            atol = RTOL * float(theirs[name].abs().max())
        torch.testing.assert_close(ours[name], theirs[name], rtol=RTOL, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------- references
class DiagOfLaplaceHessian(CurvlinopsHessian):
    """laplace-torch has no diagonal Hessian backend: the diagonal of its dense Hessian."""

    def diag(self, x, y, **kwargs):
        loss, H = self.full(x, y)
        return loss, H.diagonal()


#: (kind, structure) -> the laplace-torch backend that is the reference (BackPACK where it
#: can; it has no EF KFAC, and laplace-torch has no Hessian but Curvlinops'/ASDL's dense one)
REFERENCES = {
    ("ggn", "full"): BackPackGGN, ("ggn", "diag"): BackPackGGN, ("ggn", "kron"): BackPackGGN,
    ("ef", "full"): BackPackEF, ("ef", "diag"): BackPackEF, ("ef", "kron"): CurvlinopsEF,
    ("hessian", "full"): CurvlinopsHessian, ("hessian", "diag"): DiagOfLaplaceHessian,
}

#: (kind, subset, structure) -> laplace-torch's own ValueError, whatever the backend
LAPLACE_REJECTS = {
    **{(kind, "subnetwork", "kron"): "requires a full or diagonal" for kind in KINDS},
    ("hessian", "subnetwork", "full"): "only be used with GGN and EF",
    ("hessian", "subnetwork", "diag"): "only be used with GGN and EF",
}


@functools.cache
def reference(kind, likelihood, subset, structure):
    return summary(fit(REFERENCES[kind, structure], likelihood, subset, structure))


def check_against_laplace(backend, likelihood, subset, structure):
    key = (backend.kind, subset, structure)
    if key in LAPLACE_REJECTS:
        for be in (backend, REFERENCES[backend.kind, "full"]):
            with pytest.raises(ValueError, match=LAPLACE_REJECTS[key]):
                fit(be, likelihood, subset, structure)
        return
    if f"_{structure}" not in backend.curvop_class.supports:  # curvop says it cannot
        with pytest.raises(NotSupportedError):
            fit(backend, likelihood, subset, structure)
        return
    ours = summary(fit(backend, likelihood, subset, structure))
    assert_same(ours, reference(backend.kind, likelihood, subset, structure))


NATIVE = [cl.CurvopGGN, cl.CurvopEF, cl.CurvopHessian]
OPTIONAL = [cls for name, kinds in cl.LAPLACE_BACKENDS.items() if name != "torch"
            for cls in kinds.values()]


def _id(case):
    return "-".join(c.__name__ if isinstance(c, type) else str(c) for c in case)


@pytest.mark.parametrize(
    "case", list(itertools.product(NATIVE, LIKELIHOODS, SUBSETS, STRUCTURES)), ids=_id)
def test_native_backends_equal_laplace_torch(case):
    check_against_laplace(*case)


# the BackPACK/ASDL-backed classes: each structure and subset once, both likelihoods
OPTIONAL_COMBOS = [("classification", "all", "kron"), ("regression", "last_layer", "full"),
                   ("classification", "subnetwork", "diag"), ("regression", "all", "diag")]


@pytest.mark.parametrize(
    "case", [(cls, *combo) for cls in OPTIONAL for combo in OPTIONAL_COMBOS], ids=_id)
def test_optional_backends_equal_laplace_torch(case):
    check_against_laplace(*case)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("backend", [cl.CurvopGGN, cl.CurvopEF], ids=lambda c: c.__name__)
def test_damped_kron_uses_laplace_factor_split(backend, likelihood):
    """With damping the split of the scale over the two factors matters: it is laplace's."""
    ours = summary(fit(backend, likelihood, "all", "kron", damping=True))
    theirs = summary(fit(REFERENCES[backend.kind, "kron"], likelihood, "all", "kron",
                         damping=True))
    assert_same(ours, theirs)


# --------------------------------------------------------------------------- the methods
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_methods_follow_laplace_conventions(likelihood):
    """Layouts and scalings of each method, against laplace-torch's own implementations."""
    X, y, _ = data(likelihood)
    ours = cl.CurvopEF(make_model(likelihood), likelihood)
    theirs = laplace.curvature.CurvatureInterface(make_model(likelihood), likelihood)
    assert ours.factor == theirs.factor and type(ours.lossfunc) is type(theirs.lossfunc)
    assert [p.shape for p in ours.params] == [p.shape for p in theirs.params]
    sel = torch.arange(12) % OUTPUTS[likelihood]
    for method, args in (("jacobians", (X,)), ("functorch_jacobians", (X,)),
                         ("gradients", (X, y)), ("selected_output_jacobians", (X, sel))):
        # Js (B, C, P); gradients (Gs, loss) of lossfunc without factor
        torch.testing.assert_close(getattr(ours, method)(*args),
                                   getattr(theirs, method)(*args), msg=method)
    # last layer: laplace's FeatureExtractor, as LLLaplace passes it
    fe = laplace.utils.FeatureExtractor(make_model(likelihood), last_layer_name="2")
    theirs_ll = laplace.curvature.CurvatureInterface(fe, likelihood, last_layer=True)
    ours_ll = cl.CurvopGGN(fe, likelihood, last_layer=True)
    for got in (ours_ll.jacobians(X), ours_ll.last_layer_jacobians(X),
                ours.last_layer_jacobians(X)):
        torch.testing.assert_close(got, theirs_ll.last_layer_jacobians(X))
    # one batch's (loss, curvature); laplace's EF is curvop's divided by factor (0.3) or curvop's
    # (0.5)
    for ours_cls, ref_cls, method, args in (
        (cl.CurvopGGN, BackPackGGN, "full", (X, y)), (cl.CurvopGGN, BackPackGGN, "diag", (X, y)),
        (cl.CurvopEF, BackPackEF, "full", (X, y)), (cl.CurvopEF, BackPackEF, "diag", (X, y)),
        (cl.CurvopGGN, BackPackGGN, "kron", (X[:5], y[:5], 12)),
        (cl.CurvopEF, CurvlinopsEF, "kron", (X[:5], y[:5], 12)),
    ):
        got = getattr(ours_cls(make_model(likelihood), likelihood), method)(*args)
        model = make_model(likelihood)
        model.output_size = OUTPUTS[likelihood]  # BackPACK's Jacobians need it (fit sets it)
        want = getattr(ref_cls(model, likelihood), method)(*args)
        if method == "kron":
            got, want = (got[0], got[1].kfacs), (want[0], want[1].kfacs)
        torch.testing.assert_close(got, want, msg=f"{ours_cls.__name__}.{method}")


def test_ef_scaling_is_read_from_the_installed_laplace(monkeypatch):
    """0.3 scales the EF of ``lossfunc`` by ``factor``, 0.5 by ``factor ** 2`` (curvop's)."""
    installed = cl.LAPLACE_POWER["ef"]
    assert cl.FACTOR_POWER == {"ggn": 0, "ef": installed - 2, "hessian": 0}
    backend = cl.CurvopEF(make_model("regression"), "regression")
    assert backend._curvature_factor == 0.5 ** installed
    if hasattr(laplace.curvature.EFInterface, "_curvature_factor"):
        assert installed == 2
        assert backend._curvature_factor == laplace.curvature.EFInterface(
            make_model("regression"), "regression")._curvature_factor
    else:
        assert installed == 1
    # both conventions, whichever is installed
    monkeypatch.delattr(cl.LaplaceEFInterface, "_curvature_factor", raising=False)
    assert cl._laplace_ef_power() == 1
    monkeypatch.setattr(cl.LaplaceEFInterface, "_curvature_factor",
                        property(lambda self: self.factor ** 2), raising=False)
    assert cl._laplace_ef_power() == 2


def test_classes_mirror_the_registry():
    for name, kinds in BACKENDS.items():
        assert cl.LAPLACE_BACKENDS[name].keys() == kinds.keys()
        for kind, cls in kinds.items():
            ours = cl.LAPLACE_BACKENDS[name][kind]
            assert ours.curvop_class is cls and ours.kind == kind
            assert issubclass(ours, cl.LAPLACE_BASES[kind])
            assert getattr(cl, ours.__name__) is ours and ours.__name__ in cl.__all__
    assert {"CurvopGGN", "CurvopEF", "CurvopHessian", "CurvopBackPackGGN",
            "CurvopAsdlHessian"} <= set(cl.__all__)


# --------------------------------------------------------------------------- low rank
def dense_low_rank_reference(likelihood, full_backend, k):
    """FullLaplace whose H is the top-k part of laplace-torch's own dense curvature."""
    ref = laplace.FullLaplace(make_model(likelihood), likelihood, backend=full_backend,
                              prior_precision=PRIOR_PRECISION)
    ref.fit(loader(likelihood))
    lam, U = torch.linalg.eigh(ref.H)
    lam, U = lam.flip(0)[:k], U.flip(1)[:, :k]
    keep = lam > 1e-6
    ref.H = U[:, keep] @ torch.diag(lam[keep]) @ U[:, keep].T
    ref._posterior_scale = None
    return ref


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("backend, full_backend", [
    (cl.CurvopHessian, CurvlinopsHessian), (cl.CurvopGGN, BackPackGGN),
], ids=["hessian", "ggn"])
def test_low_rank_laplace_matches_dense_eigendecomposition(backend, full_backend, likelihood):
    la = cl.Laplace(make_model(likelihood), likelihood, "all", "lowrank", backend=backend,
                    backend_kwargs={"low_rank": 5}, prior_precision=PRIOR_PRECISION)
    assert isinstance(la, laplace.LowRankLaplace)
    la.fit(loader(likelihood))
    assert la.H[0].shape == (sum(p.numel() for p in la.model.parameters()), 5)
    ours, theirs = summary(la), summary(dense_low_rank_reference(likelihood, full_backend, 5))
    assert_same(ours, theirs, relative_to_max=True)  # eigsh's eigenvectors: norm-wise
    samples = la.sample(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, la.n_params) and torch.isfinite(samples).all()


def test_low_rank_with_asdl_hessian():
    la = cl.LowRankLaplace(make_model("classification"), "classification",
                           backend=cl.CurvopAsdlHessian, backend_kwargs={"low_rank": 4},
                           prior_precision=PRIOR_PRECISION)
    la.fit(loader("classification"))
    ref = dense_low_rank_reference("classification", CurvlinopsHessian, 4)
    assert_same(summary(la), summary(ref), relative_to_max=True)


def test_low_rank_errors():
    if find_spec("asdfghjkl") is None:  # why curvop provides LowRankLaplace at all
        with pytest.raises(ImportError, match="asdfghjkl"):
            laplace.Laplace(make_model("regression"), "regression", "all", "lowrank",
                            backend=cl.CurvopHessian)
    with pytest.raises(ValueError, match="Unsupported Laplace combination"):
        cl.Laplace(make_model("regression"), "regression", "last_layer", "lowrank")
    with pytest.raises(ValueError, match="requires a full or diagonal"):
        cl.Laplace(make_model("regression"), "regression", "subnetwork", "lowrank",
                   subnetwork_indices=SUBNET)
    la = cl.LowRankLaplace(make_model("regression"), "regression", backend=cl.CurvopEF)
    with pytest.raises(NotSupportedError, match="low_rank"):
        la.fit(loader("regression"))
    with pytest.raises(NotSupportedError, match="eig_lowrank"):
        cl.LowRankLaplace(make_model("regression"), "regression", backend=BackPackGGN)
    with pytest.raises(ValueError, match="does not support updating"):
        la.fit(loader("regression"), override=False)
    X, y, _ = data("regression")
    shuffled = DataLoader(TensorDataset(X, y), batch_size=5, shuffle=True,
                          generator=torch.Generator().manual_seed(0))
    la = cl.LowRankLaplace(make_model("regression"), "regression",
                           backend_kwargs={"low_rank": 3})
    with pytest.raises(InputError, match="shuffle=False"):  # eig_lowrank streams it repeatedly
        la.fit(shuffled)


# --------------------------------------------------------------------------- workflows
@pytest.mark.parametrize("likelihood, subset, structure, prior_structure", [
    ("classification", "all", "kron", "layerwise"), ("regression", "last_layer", "full", "scalar"),
    ("regression", "all", "diag", "diag"),
])
def test_marglik_prior_optimisation_matches(likelihood, subset, structure, prior_structure):
    results = []
    for backend in (cl.CurvopGGN, BackPackGGN):
        la = fit(backend, likelihood, subset, structure)
        la.optimize_prior_precision(pred_type="glm", method="marglik", n_steps=30, lr=0.1,
                                    prior_structure=prior_structure)
        results.append((la.prior_precision.detach(), la.log_marginal_likelihood().detach()))
    torch.testing.assert_close(*results, rtol=RTOL, atol=1e-9)


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_frozen_parameters_match_laplace_torch(structure):
    """Frozen weights (laplace refuses BackPACK for them; its default backend works)."""
    results = []
    for backend in (cl.CurvopGGN, laplace.curvature.CurvlinopsGGN):
        model = make_model("classification")
        model[0].weight.requires_grad_(False)
        la = laplace.Laplace(model, "classification", subset_of_weights="all",
                             hessian_structure=structure, backend=backend,
                             prior_precision=PRIOR_PRECISION)
        la.fit(loader("classification"))
        assert la.n_params == 38 - 15
        results.append(summary(la))
    assert_same(*results)


def test_default_backend_of_laplace_wrapper_is_curvop():
    la = cl.Laplace(make_model("classification"), "classification", "all", "diag",
                    prior_precision=PRIOR_PRECISION)
    assert type(la) is laplace.DiagLaplace
    la.fit(loader("classification"))
    assert isinstance(la.backend, cl.CurvopGGN)
    assert_same(summary(la), reference("ggn", "classification", "all", "diag"))


def test_stochastic_backend_kwargs_reach_curvop():
    runs = []
    for _ in range(2):
        la = fit(cl.CurvopGGN, "classification", "all", "diag",
                 backend_kwargs={"stochastic": True, "num_samples": 3,
                                 "generator": torch.Generator().manual_seed(7)})
        assert la.backend.stochastic and la.backend.num_samples == 3
        runs.append(la.H)
    torch.testing.assert_close(*runs)
    exact = fit(cl.CurvopGGN, "classification", "all", "diag").H
    assert not torch.allclose(runs[0], exact)


@pytest.mark.parametrize("backend, structure", [
    (cl.CurvopGGN, "kron"), (cl.CurvopBackPackGGN, "kron"), (cl.CurvopBackPackGGN, "diag"),
    (cl.CurvopAsdlGGN, "kron"), (cl.CurvopBackPackEF, "full"),
], ids=lambda v: getattr(v, "__name__", v))
def test_user_model_is_left_as_laplace_itself_leaves_it(backend, structure):
    """No hooks, attributes, gradients or state of curvop's (or BackPACK's/ASDL's) remain."""
    model = make_model("classification")
    model.output_size = OUTPUTS["classification"]  # what laplace's fit sets itself
    model.eval()
    before = snapshot(model)
    la = laplace.Laplace(model, "classification", subset_of_weights="all",
                         hessian_structure=structure, backend=backend)
    la.fit(loader("classification"))
    la(data("classification")[2], pred_type="glm")
    assert_untouched(model, before)


# --------------------------------------------------------------------------- errors
def test_errors_are_clear():
    X, y, _ = data("classification")
    la = fit(cl.CurvopGGN, "classification", "all", "full")
    la.enable_backprop = True
    with pytest.raises(NotSupportedError, match="enable_backprop"):
        la(X[:2], pred_type="glm")
    backend = cl.CurvopGGN(make_model("classification"), "classification")
    with pytest.raises(InputError, match="subnetwork_indices"):
        backend.subnetwork_indices = torch.tensor([0, 0])
    with pytest.raises(InputError, match="subnetwork_indices"):
        backend.subnetwork_indices = torch.tensor([38])
    backend.subnetwork_indices = torch.tensor([1, 2])
    assert backend.full(X, y)[1].shape == (2, 2)
    with pytest.raises(InputTypeError, match="approx"):
        backend.diag(X, y, approx="expand")
    with pytest.raises(ValueError, match="likelihood"):
        cl.CurvopGGN(make_model("classification"), "poisson")
    with pytest.raises(TypeError, match="CurvopGGN"):
        cl.CurvopBackend(make_model("classification"), "classification")
    with pytest.raises(AttributeError, match="stochastic"):
        assert cl.CurvopEF(make_model("classification"), "classification").stochastic
    fe = laplace.utils.FeatureExtractor(make_model("classification"))
    with pytest.raises(InputError, match="last layer is not known"):
        cl.CurvopGGN(fe, "classification", last_layer=True)
    fe = laplace.utils.FeatureExtractor(make_model("classification"), last_layer_name="2",
                                        feature_reduction="average")
    with pytest.raises(NotSupportedError, match="feature_reduction"):
        cl.CurvopGGN(fe, "classification", last_layer=True)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_gp_structure_admits_only_laplace_backends(subset):
    """laplace-torch's FunctionalLaplace asserts its backend is one of its own three GGNs."""
    with pytest.raises(AssertionError):
        laplace.Laplace(make_model("regression"), "regression", subset, "gp",
                        backend=cl.CurvopGGN, n_subset=12)


def test_kron_layout_laplace_cannot_hold_is_refused():
    """A grouped convolution has one Kronecker block per group; laplace's Kron has one."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(),
                          nn.Linear(4 * 2 * 2, 3)).double()
    X = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    with pytest.raises(NotSupportedError, match="one block per parameter tensor"):
        cl.CurvopGGN(model, "classification").kron(X, y, 5)


# --------------------------------------------------------------------------- example
def test_example_runs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runpy.run_path(str(EXAMPLE), run_name="__main__")
