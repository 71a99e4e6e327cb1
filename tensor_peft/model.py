"""Model-level API: put adapters into a model, merge, unload, save and load them.

The configs of a model's adapters live in ``model.tensor_peft_configs`` (adapter name ->
config, with ``target_modules`` resolved to the adapted module names)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__, peft_format
from .config import (
    AdapterConfig,
    FLoRAConfig,
    LieRAConfig,
    LoRAConfig,
    ModuleSpec,
    MTLoRAConfig,
    SNELLAConfig,
    SNELLConfig,
    check_choice,
)
from .nn import AdapterLayer, FLoRALayer, LieRALayer, LoRALayer, MTLoRALayer, SNELLALayer, SNELLLayer
from .nn.attention import AdaptedMultiheadAttention, projection_weights
from .nn.base import Adapter, layer_kind
from .quantized import RequantizationWarning, quantization_of

METHODS: dict[str, tuple[type[AdapterConfig], type[AdapterLayer]]] = {
    "lora": (LoRAConfig, LoRALayer),
    "mtlora": (MTLoRAConfig, MTLoRALayer),
    "flora": (FLoRAConfig, FLoRALayer),
    "liera": (LieRAConfig, LieRALayer),
    "snell": (SNELLConfig, SNELLLayer),
    "snella": (SNELLAConfig, SNELLALayer),
}
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CURRENT_LINK = ".tensor_peft_adapter"  # in a saved adapter's directory: the link to the current files' directory
VERSION_PREFIX = ".tensor_peft_adapter-"  # the name of each such directory (and of links being renamed into place)


ALL_LINEAR = "all-linear"


def _spec_items(spec: ModuleSpec) -> list:
    return [spec] if isinstance(spec, (str, type)) else list(spec)


def _matches(name: str, module: nn.Module, item: str | type, regex: bool) -> bool:
    """Whether module ``name`` is named by one spec item: a type, a regex (full match) or
    a name (the full name or a dotted suffix)."""
    if isinstance(item, type):
        return isinstance(module, item)
    if regex:
        return re.fullmatch(item, name) is not None
    return name == item or name.endswith("." + item)


def _is_linear(module: nn.Module) -> bool:
    try:
        return layer_kind(module) == "linear"
    except TypeError:
        return False


def _selected(model: nn.Module, modules: dict[str, nn.Module], spec: ModuleSpec, field: str) -> set[str]:
    """The names in ``modules`` that ``spec`` selects; warns about list entries that select none."""
    if spec is None:
        return set()
    if spec == ALL_LINEAR:  # every linear layer but the output head, as peft does
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return {name for name, m in modules.items() if _is_linear(m) and m is not head}
    regex = isinstance(spec, str)
    selected = set()
    for item in _spec_items(spec):
        found = {name for name, module in modules.items() if name and _matches(name, module, item, regex)}
        if not found and not regex:
            warnings.warn(f"{field} entry {item!r} matches no module of the model")
        selected |= found
    return selected


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """The model's adapter layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _original_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules as the user built them, by name: an adapter layer stands for its
    base layer, an adapted attention for its ``nn.MultiheadAttention`` (and that one's
    ``out_proj``); the insides of both are left out."""
    modules, wrappers = {}, []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrappers):
            continue
        if isinstance(module, AdaptedMultiheadAttention):
            modules[name] = module.base_layer
            modules[_join(name, "out_proj")] = module.base_layer.out_proj
            wrappers.append(name)
        elif isinstance(module, AdapterLayer):
            modules[name] = module.base_layer
            wrappers.append(name)
        else:
            modules[name] = module
    return modules


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _targets(model: nn.Module, config: AdapterConfig) -> dict[str, list[str] | None]:
    """What ``config`` adapts, checked before anything changes: layer names (value None),
    and attention names with the projections to adapt."""
    modules = _original_modules(model)
    names = _selected(model, modules, config.target_modules, "target_modules")
    names -= _selected(model, modules, config.exclude_modules, "exclude_modules")
    if not names:
        raise ValueError(f"target_modules {config.target_modules!r} matched no module of the model")
    if "" in names:
        raise ValueError("target_modules matched the model itself: wrap a layer directly instead")
    targets: dict[str, list[str] | None] = {}
    unsupported = []
    for name in sorted(names):
        module, parent_name = modules[name], name.rpartition(".")[0]
        if isinstance(module, nn.MultiheadAttention):
            targets[name] = list(projection_weights(module))
        elif isinstance(modules.get(parent_name), nn.MultiheadAttention) and name.endswith(".out_proj"):
            targets.setdefault(parent_name, []).append("out_proj")  # read by the attention's forward
        else:
            try:
                layer_kind(module)
                targets[name] = None
            except TypeError as error:
                unsupported.append(f"module {name!r}: {error}")
    if unsupported:
        raise ValueError("; ".join(unsupported))
    for name in targets:
        current = model.get_submodule(name)
        layers = current.projections().values() if isinstance(current, AdaptedMultiheadAttention) else [current]
        for layer in layers:
            if isinstance(layer, AdapterLayer) and layer.method != config.method:
                raise ValueError(
                    f"module {name!r} already holds {layer.method} adapters; cannot add {config.method} adapters to it"
                )
    return targets


def _resolve_modules_to_save(model: nn.Module, config: AdapterConfig, targets: dict) -> list[str] | None:
    """The full names of ``config.modules_to_save``: each entry must name a module (full
    name or dotted suffix) that holds no adapter target and lies in none."""
    if not config.modules_to_save:
        return None
    modules = _original_modules(model)
    names = set()
    for entry in config.modules_to_save:
        found = {name for name in modules if name and _matches(name, modules[name], entry, regex=False)}
        if not found:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model")
        names |= found
    for name in names:
        clash = next((t for t in targets if t == name or t.startswith(name + ".") or name.startswith(t + ".")), None)
        if clash is not None:
            raise ValueError(f"module {name!r} is in modules_to_save and holds adapter target {clash!r}: it can be only one")
    return sorted(names)


def _module_tensors(model: nn.Module, names: list[str] | None) -> dict[str, torch.Tensor]:
    """The state of the modules ``names`` (modules_to_save), keyed ``<module>.<key>``."""
    return {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name in names or ()
        for key, value in model.get_submodule(name).state_dict().items()
    }


def _saved_target_names(targets: dict[str, list[str] | None], model: nn.Module) -> list[str]:
    """The names a saved adapter records: those that select the same modules again in a
    fresh model (an attention adapted on ``out_proj`` alone is recorded by that name)."""
    names, modules = [], _original_modules(model)
    for name, projections in targets.items():
        if projections is None or set(projections) == set(projection_weights(modules[name])):
            names.append(name)
        else:
            names.extend(_join(name, projection) for projection in projections)
    return sorted(names)


def _shared_parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """Module names by parameter id, for the parameters more than one module holds."""
    owners: dict[int, list[str]] = {}
    for name, module in _original_modules(model).items():
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    return {key: names for key, names in owners.items() if len(names) > 1}


def _tied_to(shared: dict[int, list[str]], name: str, layer: AdapterLayer) -> list[str]:
    """The other modules that hold the weight of layer ``name`` (from ``_shared_parameter_owners``)."""
    return [owner for owner in shared.get(id(layer.base_layer.weight), []) if owner != name]


def _check_untied(model: nn.Module, layers: dict[str, AdapterLayer], action: str) -> None:
    """Refuse to write a weight that another module holds too (tied weights)."""
    shared = _shared_parameter_owners(model)
    for name, layer in layers.items():
        others = _tied_to(shared, name, layer)
        if others and layer.pending_merge():
            raise ValueError(
                f"cannot {action} module {name!r}: its weight is tied to module {others[0]!r}, which the "
                f"merge would change too; untie the weights first (or unload with merge=False)"
            )


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


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default", format: str = "tensor_peft") -> None:
    """Write adapter ``adapter_name`` to directory ``path``: its config as JSON and its
    tensors as safetensors (keys ``<module name>.<parameter>``, and
    ``modules_to_save.<module>.<key>``). ``format="peft"`` writes peft's LoRA format
    instead (``peft.PeftModel.from_pretrained`` loads it), for the methods whose update is
    exactly a low-rank product; the others raise saying why. The adapter in ``path`` is
    replaced in one step: interrupted anywhere, ``path`` holds the old adapter or the new
    one, never a mix (``_replace_adapter_files``)."""
    configs = getattr(model, "tensor_peft_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter named {adapter_name!r}")
    check_choice(format, "format", ("tensor_peft", "peft"))
    config = configs[adapter_name]
    layers = {name: layer for name, layer in adapter_layers(model).items() if adapter_name in layer.adapters}
    module_tensors = _module_tensors(model, config.modules_to_save)
    if format == "peft":
        fields, tensors = peft_format.export_tensors(model, layers, adapter_name, config.modules_to_save, module_tensors)
    else:
        fields = {"tensor_peft_version": __version__, "method": config.method, "config": dataclasses.asdict(config)}
        tensors = {f"{peft_format.MODULES_TO_SAVE}.{key}": value for key, value in module_tensors.items()}
        for name, layer in layers.items():
            for key, value in layer.adapters[adapter_name].state_dict().items():
                tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
    config_text = json.dumps(fields, indent=2)
    _replace_adapter_files(Path(path), {WEIGHTS_FILE: lambda file: save_file(tensors, str(file)),
                                        CONFIG_FILE: lambda file: file.write_text(config_text)})  # fmt: skip


def _replace_adapter_files(path: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Replace the adapter files in directory ``path`` in one step, wherever the save is
    interrupted: a reader finds the old adapter or the new one, never a mix.

    The files are written into a new directory beside the current one (``VERSION_PREFIX``
    + a random suffix), and the link ``CURRENT_LINK`` is renamed over to name it: that
    rename is the swap. The files' own names in ``path`` are links through
    ``CURRENT_LINK``, for peft and every other reader. Files that are not such links yet
    (peft's, an earlier tensor_peft's, a file an editor replaced) are first copied into
    a directory of their own that ``CURRENT_LINK`` names, so that every step of putting
    the links in place shows the old adapter. Other files of ``path`` are left alone;
    the replaced directories are removed."""
    path.mkdir(parents=True, exist_ok=True)
    for name in writers:
        if (path / name).is_dir():
            raise ValueError(f"path: {path / name} is a directory; cannot save the adapter there")
    if not _links_in_place(path):
        _swap_in(path, {name: lambda file, source=path / name: _copy_if_present(source, file) for name in writers})
        for name in writers:
            _replace_with_link(path / name, f"{CURRENT_LINK}/{name}")
    _swap_in(path, writers)
    current = os.readlink(path / CURRENT_LINK)  # ours, unless another save swapped in since
    for entry in path.iterdir():
        if entry.name.startswith(VERSION_PREFIX) and entry.name != current:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _links_in_place(path: Path) -> bool:
    """Whether the adapter's files in ``path`` are links through ``CURRENT_LINK``."""
    return all(os.path.islink(path / name) and os.readlink(path / name) == f"{CURRENT_LINK}/{name}"
               for name in (CONFIG_FILE, WEIGHTS_FILE))  # fmt: skip


def _swap_in(path: Path, writers: dict[str, Callable[[Path], None]]) -> str:
    """Write a new directory of files in ``path`` (``writers``: file name -> the call that
    writes it) and rename ``CURRENT_LINK`` over to it; returns its name. Nothing that
    readers see changes unless it all succeeds."""
    version = f"{VERSION_PREFIX}{uuid.uuid4().hex}"
    staged_link = path / f"{version}.link"
    try:
        (path / version).mkdir()
        for name, write in writers.items():
            write(path / version / name)
        os.symlink(version, staged_link)
        os.replace(staged_link, path / CURRENT_LINK)
    except BaseException:
        staged_link.unlink(missing_ok=True)
        shutil.rmtree(path / version, ignore_errors=True)
        raise
    return version


def _copy_if_present(source: Path, destination: Path) -> None:
    if source.exists():
        shutil.copyfile(source, destination)


def _replace_with_link(file: Path, target: str) -> None:
    """Make ``file`` a link to ``target`` in one rename."""
    staged = file.with_name(f"{VERSION_PREFIX}{uuid.uuid4().hex}.link")
    os.symlink(target, staged)
    os.replace(staged, file)


def _adapter_directory(path: Path) -> Path:
    """The directory to read an adapter's files from: the one ``CURRENT_LINK`` names,
    read once so that both files come from one save, while the files in ``path`` are
    links through it; else ``path`` itself (peft's files, a file replaced by hand)."""
    link = path / CURRENT_LINK
    return path / os.readlink(link) if _links_in_place(path) and link.is_symlink() else path


def _read_adapter(path: Path, model: nn.Module) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config and tensors saved in ``path`` (tensor_peft's format or peft's LoRA), or a
    ValueError naming the file and what is wrong (or the module of ``model`` whose peft
    update is not what tensor_peft would compute)."""
    file, directory = path / CONFIG_FILE, _adapter_directory(path)
    try:
        saved = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, ValueError, safetensors.SafetensorError) as error:
        raise ValueError(f"{path} holds no readable adapter: {type(error).__name__}: {error}") from None
    if isinstance(saved, dict) and peft_format.is_peft_config(saved):
        config, tensors = peft_format.import_config(saved, tensors, str(file), str(path / WEIGHTS_FILE))
        modules = _original_modules(model)
        for name in config.target_modules:
            if name in modules:
                peft_format.check_peft_computes_alike(name, modules[name])
        return config, tensors
    try:
        method, fields = saved["method"], dict(saved["config"])
        names = fields["target_modules"]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{file} is not a tensor_peft adapter config: {type(error).__name__}: {error}") from None
    if method not in METHODS:
        raise ValueError(f"{file} holds an unknown method {method!r}")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{file}: target_modules must be a list of module names, got {names!r}")
    try:
        return METHODS[method][0].from_saved({**fields, "target_modules": names}), tensors
    except TypeError as error:
        raise ValueError(f"{file} does not fit {METHODS[method][0].__name__}: {error}") from None


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Add the adapter saved in ``path`` (by ``save_adapter``, or a peft LoRA adapter) to
    ``model`` as ``adapter_name`` and make it active. Raises, naming the module, where the
    model's modules do not fit the file (missing module, other method, other shapes); the
    model is then left as it was."""
    path = Path(path)
    config, tensors = _read_adapter(path, model)
    modules = _original_modules(model)
    for name in [*config.target_modules, *(config.modules_to_save or ())]:
        if name not in modules:
            raise ValueError(f"the saved adapter has module {name!r}, which the model lacks")
    config = dataclasses.replace(config, target_modules="|".join(map(re.escape, config.target_modules)))
    take_back = _inject(model, config, adapter_name)
    try:
        _load_tensors(model, adapter_name, tensors)
        set_adapter(model, adapter_name)
    except BaseException:
        take_back()
        raise
    return model


def load_adapter_weights(model: nn.Module, path: str | Path, adapter_name: str = "default") -> None:
    """Copy the tensors saved in ``path`` into the model's existing adapter
    ``adapter_name`` (and its modules_to_save), all checked before any is written."""
    configs = getattr(model, "tensor_peft_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter named {adapter_name!r}")
    config, tensors = _read_adapter(Path(path), model)
    if config.method != configs[adapter_name].method:
        raise ValueError(f"{path} holds a {config.method} adapter; adapter {adapter_name!r} is {configs[adapter_name].method}")
    _load_tensors(model, adapter_name, tensors)


def _load_tensors(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Load the saved tensors into the adapter's modules and its modules_to_save, every
    key and shape checked before anything is written."""
    destinations = {
        name: layer.adapters[adapter_name] for name, layer in adapter_layers(model).items() if adapter_name in layer.adapters
    }
    for name in model.tensor_peft_configs[adapter_name].modules_to_save or ():
        destinations[f"{peft_format.MODULES_TO_SAVE}.{name}"] = model.get_submodule(name)
    tensors = dict(tensors)
    for name, module in destinations.items():
        if isinstance(module, Adapter):
            module.upgrade_saved(tensors, f"{name}.")
    expected = {
        f"{name}.{key}": (name, key, value)
        for name, module in destinations.items()
        for key, value in module.state_dict().items()
    }
    if set(expected) != set(tensors):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"saved adapter does not fit the model: missing {missing}, unexpected {unexpected}")
    for key, (name, param_key, value) in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ValueError(
                f"module {name!r}: saved {param_key} has shape "
                f"{tuple(tensors[key].shape)}, the model's has {tuple(value.shape)}"
            )
    for name, module in destinations.items():  # load_state_dict: also the adapters' extra state
        module.load_state_dict({key: tensors[f"{name}.{key}"] for key in module.state_dict()})
