"""Getting a model with quantized layers ready for adapter training."""

from __future__ import annotations

import torch
from torch import nn

from ..quantized import quantization_of


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True,
                              gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:  # fmt: skip
    """Get a model with quantized layers ready for adapter training (call it before
    ``inject``), as peft's ``prepare_model_for_kbit_training``: every parameter frozen, the
    float16/bfloat16 parameters but the quantized weights (layer norms, embeddings, output
    head, biases) cast to float32 for a stable training, and with ``gradient_checkpointing``
    a transformers model's gradient checkpointing turned on (``use_reentrant=False`` unless
    ``gradient_checkpointing_kwargs`` says otherwise; reentrant checkpointing gets its input
    embeddings' output requiring grad, without which it passes no gradient). Returns ``model``."""
    if gradient_checkpointing and not hasattr(model, "gradient_checkpointing_enable"):
        raise TypeError(
            f"gradient_checkpointing needs a transformers model (gradient_checkpointing_enable); got "
            f"{type(model).__name__}: pass gradient_checkpointing=False and checkpoint its blocks yourself"
        )
    kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
    quantized_weights = {id(module.weight) for module in model.modules() if _quantized(module)}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
        if parameter.dtype in (torch.float16, torch.bfloat16) and id(parameter) not in quantized_weights:
            parameter.data = parameter.data.float()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs["use_reentrant"]:
            model.enable_input_require_grads()
    return model


def _quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized layer (one the adapters cannot wrap included)."""
    try:
        return quantization_of(module) is not None
    except TypeError:
        return True
