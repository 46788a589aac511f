"""Synthetic, seeded benchmark problems.

Every problem is a function ``fn(quick=False) -> (model, x, y, likelihood)``; the data are
drawn from a seeded generator, so nothing is downloaded and every run sees the same tensors.
``quick=True`` returns a tiny variant of the same architecture for smoke tests.

The registry :data:`PROBLEMS` maps a name to its function; :func:`make_problem` builds a
problem on a device and dtype and wraps it in a :class:`Problem`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["PROBLEMS", "DEFAULT_PROBLEMS", "Problem", "make_problem"]

ProblemTuple = tuple[nn.Module, Tensor, Tensor, str]


@dataclass
class Problem:
    """A model, a batch and a likelihood, ready to benchmark.

    Attributes:
        name: Registry name of the problem.
        model: The network; its mode (train/eval) is part of the problem.
        x: Inputs, `(B, ...)`.
        y: Class labels, `(B,)`.
        likelihood: ``'classification'`` or ``'regression'``.
        quick: Whether this is the tiny smoke-test variant.
    """

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    likelihood: str
    quick: bool = False

    @property
    def num_params(self) -> int:
        """Number `P` of trainable parameters."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def batch_size(self) -> int:
        """Batch size `B`."""
        return int(self.x.shape[0])

    @property
    def num_outputs(self) -> int:
        """Number `C` of model outputs (classes)."""
        with torch.no_grad():
            return int(self.model(self.x[:1]).shape[-1])

    @property
    def device(self) -> torch.device:
        """Device of the model and the data."""
        return self.x.device

    def lossfunc(self) -> nn.Module:
        """Summed loss of the likelihood, matching curvop's convention (SPEC §3)."""
        if self.likelihood == "classification":
            return nn.CrossEntropyLoss(reduction="sum")
        return nn.MSELoss(reduction="sum")

    def info(self) -> dict:
        """JSON-serialisable description of the problem."""
        return {
            "name": self.name,
            "quick": self.quick,
            "num_params": self.num_params,
            "batch_size": self.batch_size,
            "num_outputs": self.num_outputs,
            "input_shape": list(self.x.shape),
            "likelihood": self.likelihood,
            "training_mode": self.model.training,
            "dtype": str(self.x.dtype) if self.x.is_floating_point() else "float32",
            "modules": sorted({type(m).__name__ for m in self.model.modules()}),
        }


def _seeded(seed: int) -> torch.Generator:
    """Seed torch's global generator (parameter init) and return a data generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _data(gen: torch.Generator, shape: tuple[int, ...], batch: int, classes: int):
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return x, y


def mlp(quick: bool = False) -> ProblemTuple:
    """MLP 784-256-256-10 with ReLU on a batch of 128 (quick: 20-16-16-3, batch 8).

    Args:
        quick: Return the tiny variant.

    Returns:
        `(model, x, y, 'classification')`.
    """
    d_in, h, c, b = (20, 16, 3, 8) if quick else (784, 256, 10, 128)
    gen = _seeded(1)
    model = nn.Sequential(
        nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, c)
    )
    return model.eval(), *_data(gen, (d_in,), b, c), "classification"


def mlp_small(quick: bool = False) -> ProblemTuple:
    """MLP 196-32-10 on a batch of 128, small enough for dense `P x P` matrices.

    Args:
        quick: Return the tiny variant (12-8-3, batch 8).

    Returns:
        `(model, x, y, 'classification')`.
    """
    d_in, h, c, b = (12, 8, 3, 8) if quick else (196, 32, 10, 128)
    gen = _seeded(2)
    model = nn.Sequential(nn.Linear(d_in, h), nn.Tanh(), nn.Linear(h, c))
    return model.eval(), *_data(gen, (d_in,), b, c), "classification"


def mlp_layernorm(quick: bool = False) -> ProblemTuple:
    """The :func:`mlp` with a LayerNorm after each hidden layer.

    Args:
        quick: Return the tiny variant.

    Returns:
        `(model, x, y, 'classification')`.
    """
    d_in, h, c, b = (20, 16, 3, 8) if quick else (784, 256, 10, 128)
    gen = _seeded(3)
    model = nn.Sequential(
        nn.Linear(d_in, h),
        nn.LayerNorm(h),
        nn.ReLU(),
        nn.Linear(h, h),
        nn.LayerNorm(h),
        nn.ReLU(),
        nn.Linear(h, c),
    )
    return model.eval(), *_data(gen, (d_in,), b, c), "classification"


def cnn(quick: bool = False) -> ProblemTuple:
    """Three Conv2d+ReLU+MaxPool stages and two Linear layers on 3x32x32, batch 64.

    About 189k parameters (quick: 3x8x8 images, batch 4, ~1.5k parameters).

    Args:
        quick: Return the tiny variant.

    Returns:
        `(model, x, y, 'classification')`.
    """
    side, (c1, c2, c3), hid, c, b = (8, (4, 4, 4), 8, 3, 4) if quick else (
        32, (32, 64, 64), 128, 10, 64
    )
    gen = _seeded(4)
    model = nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c3 * (side // 8) ** 2, hid), nn.ReLU(),
        nn.Linear(hid, c),
    )
    return model.eval(), *_data(gen, (3, side, side), b, c), "classification"


class PreLNBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))``.

    ``need_weights=True`` routes :class:`torch.nn.MultiheadAttention` through its explicit
    softmax path, which supports forward-mode AD; the fused kernels do not.
    """

    def __init__(self, d: int, heads: int, ffn: int):
        """Build the block.

        Args:
            d: Model width.
            heads: Number of attention heads.
            ffn: Hidden width of the MLP.
        """
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=0.0, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))

    def forward(self, h: Tensor) -> Tensor:
        """Apply the block to `(B, T, d)` features."""
        z = self.ln1(h)
        a, _ = self.attn(z, z, z, need_weights=True)
        h = h + a
        return h + self.mlp(self.ln2(h))


class SequenceClassifier(nn.Module):
    """Embedding, one encoder block, LayerNorm, mean pool over tokens, Linear head."""

    def __init__(self, vocab: int, d: int, block: nn.Module, classes: int):
        """Build the classifier.

        Args:
            vocab: Vocabulary size.
            d: Model width.
            block: The encoder block mapping `(B, T, d)` to `(B, T, d)`.
            classes: Number of classes.
        """
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.block = block
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """Map `(B, T)` token ids to `(B, classes)` logits."""
        return self.head(self.norm(self.block(self.embed(tokens))).mean(dim=1))


def _tokens(gen: torch.Generator, vocab: int, seq: int, batch: int, classes: int):
    x = torch.randint(0, vocab, (batch, seq), generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return x, y


def transformer(quick: bool = False) -> ProblemTuple:
    """Embedding(1000, 64) + pre-LN block (4 heads, MLP 256) + LayerNorm + head, ~115k params.

    Sequences of 32 tokens, batch 32, 10 classes. The model is in train mode (dropout is 0,
    so it is deterministic) because the eval-mode fast path of ``nn.MultiheadAttention``
    has no forward-mode AD.

    Args:
        quick: Return the tiny variant (vocab 20, width 8, 2 heads, 4 tokens, batch 4).

    Returns:
        `(model, x, y, 'classification')`.
    """
    vocab, d, heads, ffn, seq, b, c = (20, 8, 2, 16, 4, 4, 3) if quick else (
        1000, 64, 4, 256, 32, 32, 10
    )
    gen = _seeded(5)
    model = SequenceClassifier(vocab, d, PreLNBlock(d, heads, ffn), c)
    return model.train(), *_tokens(gen, vocab, seq, b, c), "classification"


def transformer_encoder(quick: bool = False) -> ProblemTuple:
    """As :func:`transformer` but with the stock ``nn.TransformerEncoderLayer`` in eval mode.

    This is what most users write; its fused kernels support reverse-mode AD only, so
    it shows which libraries need forward-mode AD.

    Args:
        quick: Return the tiny variant.

    Returns:
        `(model, x, y, 'classification')`.
    """
    vocab, d, heads, ffn, seq, b, c = (20, 8, 2, 16, 4, 4, 3) if quick else (
        1000, 64, 4, 256, 32, 32, 10
    )
    gen = _seeded(6)
    layer = nn.TransformerEncoderLayer(
        d, heads, ffn, dropout=0.0, batch_first=True, norm_first=True
    )
    model = SequenceClassifier(vocab, d, layer, c)
    return model.eval(), *_tokens(gen, vocab, seq, b, c), "classification"


PROBLEMS: dict[str, Callable[[bool], ProblemTuple]] = {
    "mlp": mlp,
    "mlp_small": mlp_small,
    "cnn": cnn,
    "mlp_layernorm": mlp_layernorm,
    "transformer": transformer,
    "transformer_encoder": transformer_encoder,
}
"""Name -> problem function."""

DEFAULT_PROBLEMS = list(PROBLEMS)


def make_problem(
    name: str,
    quick: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Problem:
    """Build a registered problem, seeded, on a device.

    Args:
        name: A key of :data:`PROBLEMS`.
        quick: Build the tiny variant.
        device: Device for the model and the data.
        dtype: Floating dtype of the parameters and float inputs.

    Returns:
        The :class:`Problem`.

    Raises:
        ValueError: If ``name`` is not registered.
    """
    if name not in PROBLEMS:
        raise ValueError(f"`name` must be one of {sorted(PROBLEMS)}; got {name!r}")
    model, x, y, likelihood = PROBLEMS[name](quick)
    model = model.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    return Problem(name, model, x, y.to(device), likelihood, quick)
