"""Small float64 classification problems shared by the linalg tests."""

from __future__ import annotations

import torch

from cases import register


def tanh_mlp(d_in: int, hidden: int, n: int, data_seed: int = 1, classes: int = 3):
    """A registered Linear-Tanh-Linear float64 model (seed 0) and ``n`` labelled points.

    Returns:
        ``(model, X, Y)``.
    """
    torch.manual_seed(0)
    model = register(torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(),
                                         torch.nn.Linear(hidden, classes)).double())
    g = torch.Generator().manual_seed(data_seed)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    Y = torch.randint(0, classes, (n,), generator=g)
    return model, X, Y
