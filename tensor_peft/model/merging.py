"""Folding the active adapters into the base weights, taking them out again, and unloading."""

from __future__ import annotations

import warnings

from torch import nn

from ..nn import AdapterLayer
from ..quantized import RequantizationWarning
from .injection import _per_layer, _remove_empty_layers
from .targeting import _check_untied, adapter_layers


def merge(model: nn.Module) -> nn.Module:
    """Fold every layer's active adapters into its base weight. All or nothing: every
    layer's merge is checked (adapters switched on, finite, restorable, no tied weight)
    before any is written."""
    _merge_all(model, "merge")
    return model


def _merge_all(model: nn.Module, action: str, dequantize: bool = False) -> None:
    """Check every layer's merge, then (``dequantize``: quantized bases replaced by
    full-precision ones first) write them all; merges into quantized bases give one
    warning with the largest rounding error."""
    layers = adapter_layers(model)
    _check_untied(model, layers, action)
    _per_layer(layers, lambda layer: layer.merge(check_only=True, dequantized=dequantize))
    if dequantize:
        _dequantize_bases(layers)
    requantized = [name for name, layer in layers.items() if layer.pending_merge() and layer.quantization is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        _per_layer(layers, lambda layer: layer.merge())
    errors = {name: layers[name].requantization_error for name in requantized}
    if errors:
        worst = max(errors, key=errors.__getitem__)
        warnings.warn(
            f"merged into {len(errors)} quantized layers and quantized each again: the merged weights differ from "
            f"W0 + ΔW by up to {errors[worst]:.3g} (relative, module {worst!r}); they cannot be unmerged",
            RequantizationWarning,
            stacklevel=3,
        )


def _dequantize_bases(layers: dict[str, AdapterLayer]) -> None:
    for layer in layers.values():
        if layer.quantization is not None:
            layer.dequantize_base()


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of the base weights again (all or nothing, as merge)."""
    layers = adapter_layers(model)
    _per_layer(layers, lambda layer: layer.unmerge(check_only=True))
    _per_layer(layers, lambda layer: layer.unmerge())
    return model


def unload(model: nn.Module, merge: bool = True, dequantize: bool = False) -> nn.Module:
    """Plain torch modules back: each adapter layer is replaced by its base layer, with
    the active adapters merged in (``merge=True``) or with all adapters taken out. A
    quantized base comes back quantized (merged: quantized again, with a warning giving
    the rounding error), or with ``dequantize=True`` as an ``nn.Linear`` holding its
    dequantized weight (plus the merged update), for export. All or nothing, as ``merge``."""
    if merge:
        _merge_all(model, "unload", dequantize)
    else:
        unmerge(model)
        if dequantize:
            _dequantize_bases(adapter_layers(model))
    _remove_empty_layers(model, remove_all=True)
    if hasattr(model, "tensor_peft_configs"):
        del model.tensor_peft_configs
    return model
