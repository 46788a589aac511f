"""Test cases as data: model factories, data, likelihoods; expanded over dtypes and devices."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

#: models built by the cases of the running test, checked by the autouse fixture in conftest
LIVE_MODELS: list[nn.Module] = []

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class TwoPath(nn.Module):
    """A non-Sequential module with a frozen parameter and a skip connection."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, 5)
        self.frozen = nn.Linear(d_in, 5)
        self.frozen.weight.requires_grad_(False)
        self.scale = nn.Parameter(torch.tensor([0.7, -0.3, 1.1, 0.4, 0.9]))
        self.head = nn.Linear(5, d_out)

    def forward(self, x):
        h = torch.tanh(self.embed(x)) * self.scale + torch.sigmoid(self.frozen(x))
        return self.head(h)


def tanh_mlp(d_in, d_out):
    return nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                         nn.Linear(4, d_out))


def mlp_nobias(d_in, d_out):
    return nn.Sequential(nn.Linear(d_in, 5, bias=False), nn.Tanh(),
                         nn.Linear(5, d_out, bias=False))


def small_cnn(d_in, d_out):
    return nn.Sequential(
        nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(),
        nn.AvgPool2d(2), nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(3, d_out),
    )


def layernorm_mlp(d_in, d_out):
    return nn.Sequential(nn.Linear(d_in, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, d_out))


def batchnorm_mlp(d_in, d_out):
    net = nn.Sequential(nn.Linear(d_in, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, d_out))
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 1.5)
        net[1].weight.uniform_(0.5, 1.5)
    return net


def two_path(d_in, d_out):
    return TwoPath(d_in, d_out)


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "tanh_mlp": tanh_mlp,
    "mlp_nobias": mlp_nobias,
    "cnn": small_cnn,
    "layernorm_mlp": layernorm_mlp,
    "two_path": two_path,
    "batchnorm_mlp": batchnorm_mlp,
}

D_IN = 16
OUTPUTS = {"classification": 3, "regression": 2}


@dataclasses.dataclass
class Case:
    model_name: str
    likelihood: str
    dtype: torch.dtype = torch.float64
    device: str = "cpu"
    batch: int = 6
    seed: int = 0

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"{self.model_name}-{self.likelihood[:5]}-{dt}-{self.device}"

    def build(self):
        """Return ``(model, x, y)``; the model is registered for the untouched-model check."""
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        C = OUTPUTS[self.likelihood]
        model = MODELS[self.model_name](D_IN, C).to(self.device, self.dtype).eval()
        x = torch.randn(self.batch, D_IN, generator=g, dtype=self.dtype).to(self.device)
        if self.likelihood == "classification":
            y = torch.randint(0, C, (self.batch,), generator=g).to(self.device)
        else:
            y = torch.randn(self.batch, C, generator=g, dtype=self.dtype).to(self.device)
        register(model)
        return model, x, y

    def tol(self) -> dict:
        if self.dtype == torch.float64:
            return {"rtol": 1e-10, "atol": 1e-10}
        return {"rtol": 1e-5, "atol": 1e-5}


class Counted(nn.Module):
    """Wraps a model and counts its forward passes in ``counter``, a list outside the module
    (curvop restores the module's own attributes after each call)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.__dict__["counter"] = []

    def forward(self, x):
        self.counter.append(1)
        return self.inner(x)


def register(model: nn.Module) -> nn.Module:
    """Snapshot ``model`` now (again, if a test changed it on purpose)."""
    LIVE_MODELS[:] = [(m, s) for m, s in LIVE_MODELS if m is not model]
    LIVE_MODELS.append((model, snapshot(model)))
    return model


def snapshot(model: nn.Module) -> dict:
    return {
        "hooks": [{k: len(v) for k, v in vars(m).items() if "hooks" in k and isinstance(v, dict)}
                  for m in model.modules()],
        "dict": [sorted(vars(m)) for m in model.modules()],
        "training": [m.training for m in model.modules()],
        "grad": [p.grad is None for p in model.parameters()],
        "param_dict": [sorted(vars(p)) for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for key in ("hooks", "dict", "training", "grad", "param_dict", "requires_grad"):
        assert after[key] == before[key], f"model {key} changed: {before[key]} -> {after[key]}"
    for k, v in before["state"].items():
        same = torch.equal(after["state"][k].nan_to_num(7.0), v.nan_to_num(7.0))
        assert same, f"model state {k} changed"


def cases(models=None, likelihoods=("classification", "regression"),
          dtypes=(torch.float64,), devices=None) -> list[Case]:
    return [Case(m, lik, dt, dev)
            for m in (models or MODELS) for lik in likelihoods for dt in dtypes
            for dev in (devices or DEVICES)]
