"""FeatureExtractor: a model wrapper that knows its last layer and returns its input features."""

from __future__ import annotations

from torch import Tensor, nn

from curvop._checks import check_model
from curvop.errors import InputError, InputTypeError

__all__ = ["FeatureExtractor"]


def _find_last_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The last module, in registration order, that owns trainable parameters directly."""
    found = None
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            found = (name, module)
    if found is None:
        raise InputError("`model` has no module with trainable parameters to use as last layer")
    return found


class FeatureExtractor(nn.Module):
    """Wrap ``model`` and expose its last layer and the features that enter it.

    The last layer is the module named ``last_layer_name`` or, by default, the last module (in
    registration order) that owns trainable parameters. It must produce the model's output:
    :meth:`forward_with_features` checks this and raises otherwise.

    Args:
        model: The network.
        last_layer_name: Name of the last layer in ``model.named_modules()`` (optional).

    Raises:
        InputTypeError: If ``model`` is not an ``nn.Module``.
        InputError: If ``last_layer_name`` names no module or no module has parameters.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> fe = FeatureExtractor(net)
        >>> f, phi = fe.forward_with_features(torch.randn(5, 3))
        >>> tuple(f.shape), tuple(phi.shape)
        ((5, 2), (5, 4))
    """

    def __init__(self, model: nn.Module, last_layer_name: str | None = None) -> None:
        check_model(model)
        super().__init__()
        self.model = model
        if last_layer_name is None:
            self.last_layer_name, self.last_layer = _find_last_layer(model)
        else:
            if not isinstance(last_layer_name, str):
                raise InputTypeError(
                    f"`last_layer_name` must be a str; got {type(last_layer_name).__name__}"
                )
            modules = dict(model.named_modules())
            if last_layer_name not in modules:
                raise InputError(f"`last_layer_name` {last_layer_name!r} names no module of "
                                 f"`model`; candidates: {[n for n in modules if n][-5:]}")
            self.last_layer_name, self.last_layer = last_layer_name, modules[last_layer_name]

    def forward(self, x: Tensor) -> Tensor:
        """The wrapped model's output.

        Args:
            x: Inputs `(B, ...)`.

        Returns:
            ``model(x)``.
        """
        return self.model(x)

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return the output ``f`` `(B, C)` and the last layer's input ``phi`` `(B, D)`.

        The hook that captures ``phi`` exists only during this call.

        Args:
            x: Inputs `(B, ...)`.

        Raises:
            InputError: If the last layer's output is not the model's output.
        """
        store: dict[str, Tensor] = {}

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            store["phi"], store["out"] = inputs[0], output

        handle = self.last_layer.register_forward_hook(hook)
        try:
            f = self.model(x)
        finally:
            handle.remove()
        if "phi" not in store:
            raise InputError(f"the last layer {self.last_layer_name!r} was not called in forward")
        if store["out"] is not f:
            raise InputError(
                f"the output of the last layer {self.last_layer_name!r} is not the model's output;"
                " pass `last_layer_name` naming the layer that produces it"
            )
        return f, store["phi"]
