"""Adding adapters to a model, switching between them and taking them out again."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

from torch import nn

from ..config import AdapterConfig, FLoRAConfig, LieRAConfig, LoRAConfig, MTLoRAConfig, SNELLAConfig, SNELLConfig
from ..nn import AdapterLayer, FLoRALayer, LieRALayer, LoRALayer, MTLoRALayer, SNELLALayer, SNELLLayer
from ..nn.attention import AdaptedMultiheadAttention
from .targeting import (
    _resolve_modules_to_save, _saved_target_names, _shared_parameter_owners, _targets, _tied_to, adapter_layers,
)  # fmt: skip

METHODS: dict[str, tuple[type[AdapterConfig], type[AdapterLayer]]] = {
    "lora": (LoRAConfig, LoRALayer),
    "mtlora": (MTLoRAConfig, MTLoRALayer),
    "flora": (FLoRAConfig, FLoRALayer),
    "liera": (LieRAConfig, LieRALayer),
    "snell": (SNELLConfig, SNELLLayer),
    "snella": (SNELLAConfig, SNELLALayer),
}


def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` to the modules ``config`` targets, in place, make it
    the active adapter and freeze every parameter but its own. Returns ``model``. All or
    nothing: if any module cannot take the adapter, the model is left as it was."""
    _inject(model, config, adapter_name)
    set_adapter(model, adapter_name)
    return model


def _inject(model: nn.Module, config: AdapterConfig, adapter_name: str) -> Callable[[], None]:
    """Add the adapter (not yet active); returns the call that takes it out again and
    restores the model as it was."""
    if not isinstance(config, AdapterConfig) or config.method not in METHODS:
        names = ", ".join(c.__name__ for c, _ in METHODS.values())
        raise TypeError(f"config must be an adapter config ({names}), got {type(config).__name__}")
    configs = getattr(model, "tensor_peft_configs", {})
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    for name, layer in adapter_layers(model).items():
        if layer.merged_adapters:
            raise ValueError(f"module {name!r} has adapter {layer.merged_adapters[0]!r} merged: unmerge before adding adapters")
    targets = _targets(model, config)
    modules_to_save = _resolve_modules_to_save(model, config, targets)
    layer_class = METHODS[config.method][1]
    options = config.layer_options()
    trainable = {parameter: parameter.requires_grad for parameter in model.parameters()}
    undo: list[Callable[[], None]] = []

    def take_back() -> None:
        for step in reversed(undo):
            step()
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)
        if configs:
            model.tensor_peft_configs = configs
        elif hasattr(model, "tensor_peft_configs"):
            del model.tensor_peft_configs
        _restore_transformer_fast_paths(model)

    errors = []
    try:
        for name, projections in targets.items():
            try:
                _inject_one(model, name, projections, layer_class, adapter_name, options, undo)
            except (ValueError, TypeError) as error:
                errors.append((type(error), f"module {name!r}: {error}"))
    except BaseException:
        take_back()
        raise
    if errors:  # every module that cannot take the adapter, not just the first
        take_back()
        raise errors[0][0]("; ".join(message for _, message in errors))
    _warn_tied(model, targets)
    _disable_transformer_fast_paths(model)
    saved_config = dataclasses.replace(
        config, target_modules=_saved_target_names(targets, model), exclude_modules=None, modules_to_save=modules_to_save
    )
    model.tensor_peft_configs = {**configs, adapter_name: saved_config}
    return take_back


def _inject_one(model, name, projections, layer_class, adapter_name, options, undo) -> None:
    """Adapt module ``name`` (or those ``projections`` of the attention ``name``),
    appending to ``undo`` how to take each change back."""
    current = model.get_submodule(name)

    def make_layer(base):
        return layer_class(base, adapter_name=adapter_name, **options)

    if projections is None:
        if isinstance(current, AdapterLayer):
            _add_adapter(current, adapter_name, options, undo)
        else:
            _replace(model, name, make_layer(current))
            undo.append(lambda: _replace(model, name, current))
        return
    wrapper = current
    if not isinstance(current, AdaptedMultiheadAttention):
        wrapper = AdaptedMultiheadAttention(current)
        _replace(model, name, wrapper)
        undo.append(lambda: _replace(model, name, current))
    for projection in projections:
        layer = wrapper.projection(projection)
        if layer is None:
            wrapper.add_projection(projection, make_layer)
            undo.append(lambda p=projection: delattr(wrapper, p))
        else:
            _add_adapter(layer, adapter_name, options, undo)


def _add_adapter(layer: AdapterLayer, adapter_name: str, options: dict, undo: list) -> None:
    active = list(layer.active_adapters)
    layer.add_adapter(adapter_name, **options)

    def take_back():
        layer.delete_adapter(adapter_name)
        layer.active_adapters = active

    undo.append(take_back)


def _warn_tied(model: nn.Module, targets: dict[str, list[str] | None]) -> None:
    shared = _shared_parameter_owners(model)
    for name, projections in targets.items():
        if projections is None:
            others = _tied_to(shared, name, model.get_submodule(name))
            if others:
                warnings.warn(
                    f"module {name!r} shares its weight with module {others[0]!r} (tied weights): merge and "
                    "unload(merge=True) will refuse to write it"
                )


def _disable_transformer_fast_paths(model: nn.Module) -> None:
    """``nn.TransformerEncoderLayer`` in eval mode takes a fused fast path that reads its
    base weights directly, which would skip the adapters. A forward pre-hook is one of the
    conditions that turns the fast path off, so each encoder layer holding adapters gets a
    no-op one (removed again by ``unload``)."""
    for module in model.modules():
        if _holds_adapters(module) and _no_op_hook not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_no_op_hook)


def _holds_adapters(module: nn.Module) -> bool:
    return isinstance(module, nn.TransformerEncoderLayer) and any(isinstance(m, AdapterLayer) for m in module.modules())


def _no_op_hook(module, args):
    return None


def _restore_transformer_fast_paths(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and not _holds_adapters(module):
            for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _no_op_hook]:
                del module._forward_pre_hooks[key]


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter everywhere (layers without it run their
    base), and its parameters and its ``modules_to_save`` the only trainable parameters
    of the model. Modules to save are trained in place: adapters that name the same
    module share it."""
    if adapter_name not in getattr(model, "tensor_peft_configs", {}):
        raise ValueError(f"the model has no adapter named {adapter_name!r}")
    layers = adapter_layers(model)
    _per_layer(layers, lambda layer: layer.check_switch([adapter_name] if adapter_name in layer.adapters else []))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for layer in layers.values():
        if adapter_name in layer.adapters:
            layer.set_adapter(adapter_name)
            layer.adapters[adapter_name].requires_grad_(True)
        else:
            layer.set_adapter([])
    for name in model.tensor_peft_configs[adapter_name].modules_to_save or ():
        model.get_submodule(name).requires_grad_(True)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name``; layers left without adapters become their base again.
    All or nothing: every layer is checked (none holds the adapter merged) before any changes."""
    configs = getattr(model, "tensor_peft_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter named {adapter_name!r}")
    layers = {name: layer for name, layer in adapter_layers(model).items() if adapter_name in layer.adapters}
    _per_layer(layers, lambda layer: layer.check_delete(adapter_name))
    for layer in layers.values():
        layer.delete_adapter(adapter_name)
    _remove_empty_layers(model)
    model.tensor_peft_configs = {k: v for k, v in configs.items() if k != adapter_name}


def _remove_empty_layers(model: nn.Module, remove_all: bool = False) -> None:
    """Put the base layer back in place of each adapter layer without adapters (or of
    every one), and the attention back in place of an adapted one with no projections left."""
    for name, layer in adapter_layers(model).items():
        if remove_all or not layer.adapters:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if isinstance(parent, AdaptedMultiheadAttention):
                delattr(parent, child)
            else:
                _replace(model, name, layer.base_layer)
    for name, module in list(model.named_modules()):
        if isinstance(module, AdaptedMultiheadAttention) and not module.projections():
            _replace(model, name, module.base_layer)
    _restore_transformer_fast_paths(model)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def _per_layer(layers: dict[str, AdapterLayer], call: Callable[[AdapterLayer], None]) -> None:
    """``call(layer)`` for each layer; a ValueError names the module."""
    for name, layer in layers.items():
        try:
            call(layer)
        except ValueError as error:
            raise ValueError(f"module {name!r}: {error}") from None


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
