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

__all__ = ["DEFAULT_PROBLEMS", "LARGE_PROBLEMS", "PROBLEMS", "Problem", "make_problem"]

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


def cnn_small(quick: bool = False) -> ProblemTuple:
    """Three Conv2d+ReLU+MaxPool stages (16, 24, 32 channels) and a Linear head on 3x32x32.

    16,002 parameters at batch 64: small enough that a dense `P x P` matrix (1.0 GB in
    float32) fits in memory, so ``full()`` can be compared with laplace-torch's backends.
    Quick: 3x8x8 images, channels (4, 4, 4), batch 4 (423 parameters).

    Args:
        quick: Return the tiny variant.

    Returns:
        `(model, x, y, 'classification')`.
    """
    side, (c1, c2, c3), c, b = (8, (4, 4, 4), 3, 4) if quick else (32, (16, 24, 32), 10, 64)
    gen = _seeded(7)
    model = nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c3 * (side // 8) ** 2, c),
    )
    return model.eval(), *_data(gen, (3, side, side), b, c), "classification"


class StockSequenceClassifier(nn.Module):
    """Embedding, a stock ``nn.TransformerEncoder``, mean pool over tokens, Linear head."""

    def __init__(self, vocab: int, d: int, heads: int, ffn: int, layers: int, classes: int):
        """Build the classifier.

        Args:
            vocab: Vocabulary size.
            d: Model width.
            heads: Number of attention heads.
            ffn: Hidden width of each layer's feed-forward block.
            layers: Number of ``nn.TransformerEncoderLayer``s.
            classes: Number of classes.
        """
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """Map `(B, T)` token ids to `(B, classes)` logits."""
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def transformer_3m(quick: bool = False) -> ProblemTuple:
    """Embedding(1000, 256) + stock ``nn.TransformerEncoder`` (4 layers) + mean pool + head.

    The BERT-mini shape: width 256, 4 heads, feed-forward 1024, post-LayerNorm (the
    ``nn.TransformerEncoderLayer`` defaults, ReLU, dropout 0.1), 10 classes: 3,417,610
    parameters (embedding 256,000, each layer 789,760, head 2,570). Sequences of 32 tokens,
    batch 16. Eval mode, so dropout is off and PyTorch takes the fused encoder kernel
    (``aten::_transformer_encoder_layer_fwd``) whenever no gradient is recorded; the model
    is used exactly as built, nothing is switched off for the benchmark.

    Args:
        quick: Return the tiny variant (vocab 20, width 8, 2 heads, feed-forward 16,
            2 layers, 4 tokens, batch 4, 3 classes).

    Returns:
        `(model, x, y, 'classification')`.
    """
    vocab, d, heads, ffn, layers, seq, b, c = (20, 8, 2, 16, 2, 4, 4, 3) if quick else (
        1000, 256, 4, 1024, 4, 32, 16, 10
    )
    gen = _seeded(8)
    model = StockSequenceClassifier(vocab, d, heads, ffn, layers, c)
    return model.eval(), *_tokens(gen, vocab, seq, b, c), "classification"


class _TinyResNet(nn.Module):
    """Torchvision ``BasicBlock``s at widths 4 and 8: the quick variant of :func:`resnet18`."""

    def __init__(self, classes: int):
        """Build the network.

        Args:
            classes: Number of classes.
        """
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        self.layer1 = BasicBlock(4, 4)
        self.layer2 = BasicBlock(4, 8, stride=2, downsample=down)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map `(B, 3, H, W)` images to `(B, classes)` logits."""
        h = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(h), 1))


def _calibrate_batchnorm(model: nn.Module, x: Tensor) -> None:
    """Set every BatchNorm's running statistics to those of the batch ``x`` (one pass)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass gives the batch statistics
    model.train()
    with torch.no_grad():
        model(x)
    for m in norms:
        m.momentum = 0.1


def resnet18(quick: bool = False) -> ProblemTuple:
    """The stock torchvision ``resnet18(num_classes=10)`` on 3x32x32 images, batch 128.

    11,181,642 parameters. Stock means the ImageNet stem (7x7 stride-2 convolution and
    3x3 stride-2 max-pool, so the residual stages see 8x8 to 1x1 maps); the CIFAR variant
    (3x3 stem, no max-pool) costs 16x the FLOPs, ~40 s per forward + backward on one CPU
    thread. No weights are downloaded. The BatchNorm running statistics are set from the
    batch itself (one no-grad pass), then the model is put in eval mode, so the BatchNorms
    are fixed affine maps and the GGN is a sum over independent samples.

    Args:
        quick: Return the tiny variant (torchvision ``BasicBlock``s at widths 4 and 8,
            3x8x8 images, batch 4, 3 classes, 1,391 parameters).

    Returns:
        `(model, x, y, 'classification')`.
    """
    from torchvision.models import resnet18 as tv_resnet18

    side, c, b = (8, 3, 4) if quick else (32, 10, 128)
    gen = _seeded(9)
    model = _TinyResNet(c) if quick else tv_resnet18(weights=None, num_classes=c)
    x, y = _data(gen, (3, side, side), b, c)
    _calibrate_batchnorm(model, x)
    return model.eval(), x, y, "classification"


PROBLEMS: dict[str, Callable[[bool], ProblemTuple]] = {
    "mlp": mlp,
    "mlp_small": mlp_small,
    "cnn": cnn,
    "mlp_layernorm": mlp_layernorm,
    "transformer": transformer,
    "transformer_encoder": transformer_encoder,
    "cnn_small": cnn_small,
    "transformer_3m": transformer_3m,
    "resnet18": resnet18,
}
"""Name -> problem function."""

LARGE_PROBLEMS = ("cnn_small", "transformer_3m", "resnet18")
"""Problems that run only when named (``--problems``): minutes per entry on one CPU thread
(``transformer_3m``, ``resnet18``; the issue-10 scale) or dense `P x P` matrices of 1 GB
(``cnn_small``)."""

DEFAULT_PROBLEMS = [name for name in PROBLEMS if name not in LARGE_PROBLEMS]
"""What ``python -m benchmarks.run`` measures without ``--problems``."""


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
