"""Which layers the adapters wrap (``layer_kind``): ``nn.Linear``, ``nn.Conv1d/2d/3d`` and
``nn.Embedding``, and any subclass of them whose ``forward`` is the parent's (such as
``nn.MultiheadAttention``'s ``out_proj``); transformers' ``Conv1D`` (a linear layer whose
weight is stored (in, out)); the quantized linear layers ``tensor_peft.quantized`` knows."""

from __future__ import annotations

import sys

from torch import nn

from ..quantized import quantization_of

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
# Subclasses that override forward() with the parent's operation (timm's Linear only adds a
# cast under TorchScript), by qualified name so that their package need not be imported.
SAME_OPERATION_SUBCLASSES = ("timm.layers.linear.Linear",)


def _transformers_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (looked up only if transformers is loaded)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def layer_kind(module: nn.Module) -> str:
    """"linear", "conv" or "embedding": how the adapters see ``module``. Raises a TypeError
    saying why for a module they cannot wrap. A layer whose forward is not its parent's is
    wrapped when the package knows how to get W0·x (its forward) and W0 from it: the
    quantized linear layers of ``tensor_peft.quantized``."""
    if _transformers_conv1d(module) or quantization_of(module) is not None:
        return "linear"
    parent = next((c for c in SUPPORTED_LAYERS if isinstance(module, c)), None)
    if parent is None:
        names = ", ".join(c.__name__ for c in SUPPORTED_LAYERS)
        raise TypeError(
            f"adapters wrap {names} (and their subclasses), transformers' Conv1D and "
            f"nn.MultiheadAttention; got {type(module).__name__}"
        )
    if type(module).forward is not parent.forward and _qualified_name(type(module)) not in SAME_OPERATION_SUBCLASSES:
        raise TypeError(
            f"{type(module).__name__} subclasses nn.{parent.__name__} but overrides forward(); the adapters "
            f"run nn.{parent.__name__}'s operation with other weights, which would skip what that forward does"
        )
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise TypeError("an nn.Embedding with max_norm renormalizes its weight in forward; adapters cannot wrap it")
        return "embedding"
    return "linear" if isinstance(module, nn.Linear) else "conv"
