"""Model-level API: put adapters into a model, merge, unload, save and load them.

The configs of a model's adapters live in ``model.tensor_peft_configs`` (adapter name ->
config, with ``target_modules`` resolved to the adapted module names)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import (
    AdapterConfig,
    FLoRAConfig,
    LieRAConfig,
    LoRAConfig,
    ModuleSpec,
    MTLoRAConfig,
    SNELLAConfig,
    SNELLConfig,
)
from .nn import AdapterLayer, FLoRALayer, LieRALayer, LoRALayer, MTLoRALayer, SNELLALayer, SNELLLayer
from .nn.base import is_supported

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


def _matches(name: str, module: nn.Module, spec: ModuleSpec) -> bool:
    """Whether module ``name`` is named by ``spec``: a regex (full match), a type, or a
    list of names (full name or dotted suffix) and types."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    items = [spec] if isinstance(spec, type) else spec
    return any(
        isinstance(module, item) if isinstance(item, type) else name == item or name.endswith("." + item)
        for item in items
    )


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """The model's adapter layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def _inside_adapter_layer(name: str, layers: dict[str, AdapterLayer]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in layers)


def _targets(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """The modules ``config`` adapts, checked before anything changes."""
    layers = adapter_layers(model)
    targets = {
        name: module
        for name, module in model.named_modules()
        if not _inside_adapter_layer(name, layers)
        and _matches(name, module, config.target_modules)
        and not _matches(name, module, config.exclude_modules)
    }
    if not targets:
        raise ValueError(f"target_modules {config.target_modules!r} matched no module of the model")
    for name, module in targets.items():
        if name == "":
            raise ValueError("target_modules matched the model itself: wrap a layer directly instead")
        if isinstance(module, AdapterLayer):
            if module.method != config.method:
                raise ValueError(
                    f"module {name!r} already holds {module.method} adapters; cannot add "
                    f"{config.method} adapters to it"
                )
        elif not is_supported(module):
            raise ValueError(
                f"module {name!r} is a {type(module).__name__}; adapters wrap only nn.Linear, "
                "nn.Conv1d, nn.Conv2d and nn.Conv3d"
            )
    return targets


def inject(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` to the modules ``config`` targets, in place, make it
    the active adapter and freeze every parameter but its own. Returns ``model``."""
    if not isinstance(config, AdapterConfig) or config.method not in METHODS:
        raise TypeError(f"config must be one of {[c.__name__ for c, _ in METHODS.values()]}, got {type(config).__name__}")
    configs = getattr(model, "tensor_peft_configs", {})
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    targets = _targets(model, config)
    layer_class = METHODS[config.method][1]
    options = config.layer_options()
    for name, module in targets.items():
        if isinstance(module, AdapterLayer):
            module.add_adapter(adapter_name, **options)
        else:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer_class(module, adapter_name=adapter_name, **options))
    model.tensor_peft_configs = {
        **configs,
        adapter_name: dataclasses.replace(config, target_modules=sorted(targets), exclude_modules=None),
    }
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter everywhere (layers without it run their
    base) and the only trainable parameters of the model."""
    if adapter_name not in getattr(model, "tensor_peft_configs", {}):
        raise ValueError(f"the model has no adapter named {adapter_name!r}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for layer in adapter_layers(model).values():
        if adapter_name in layer.adapters:
            layer.set_adapter(adapter_name)
            layer.adapters[adapter_name].requires_grad_(True)
        else:
            layer.set_adapter([])


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name``; layers left without adapters become their base again."""
    configs = getattr(model, "tensor_peft_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter named {adapter_name!r}")
    for name, layer in adapter_layers(model).items():
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
        if not layer.adapters:
            _replace(model, name, layer.base_layer)
    model.tensor_peft_configs = {k: v for k, v in configs.items() if k != adapter_name}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def merge(model: nn.Module) -> nn.Module:
    """Fold every layer's active adapters into its base weight."""
    for layer in adapter_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter out of the base weights again."""
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Plain torch modules back: each adapter layer is replaced by its base layer, with
    the active adapters merged in (``merge=True``) or with all adapters taken out."""
    for name, layer in adapter_layers(model).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _replace(model, name, layer.base_layer)
    if hasattr(model, "tensor_peft_configs"):
        del model.tensor_peft_configs
    return model


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> None:
    """Write adapter ``adapter_name`` to directory ``path``: its config as JSON and its
    tensors as safetensors (keys ``<module name>.<parameter>``)."""
    configs = getattr(model, "tensor_peft_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter named {adapter_name!r}")
    config = configs[adapter_name]
    tensors = {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name, layer in adapter_layers(model).items()
        if adapter_name in layer.adapters
        for key, value in layer.adapters[adapter_name].state_dict().items()
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE))
    fields = dataclasses.asdict(config)
    (path / CONFIG_FILE).write_text(
        json.dumps({"tensor_peft_version": __version__, "method": config.method, "config": fields}, indent=2)
    )


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Add the adapter saved in ``path`` to ``model`` as ``adapter_name`` and make it
    active. Raises, naming the module, where the model's modules do not fit the file
    (missing module, other method, other shapes); the model is then left as it was."""
    path = Path(path)
    saved = json.loads((path / CONFIG_FILE).read_text())
    if saved.get("method") not in METHODS:
        raise ValueError(f"{path / CONFIG_FILE} holds an unknown method {saved.get('method')!r}")
    config_class = METHODS[saved["method"]][0]
    names = saved["config"]["target_modules"]
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the saved adapter has module {name!r}, which the model lacks") from None
    config = config_class(**{**saved["config"], "target_modules": "|".join(map(re.escape, names))})
    tensors = load_file(str(path / WEIGHTS_FILE))
    trainable = {p: p.requires_grad for p in model.parameters()}
    inject(model, config, adapter_name)
    try:
        _load_tensors(model, adapter_name, tensors)
    except ValueError:
        delete_adapter(model, adapter_name)
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)
        raise
    return model


def _load_tensors(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    adapters = {
        name: layer.adapters[adapter_name]
        for name, layer in adapter_layers(model).items()
        if adapter_name in layer.adapters
    }
    expected = {
        f"{name}.{key}": (name, key, value)
        for name, adapter in adapters.items()
        for key, value in adapter.state_dict().items()
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
    for name, adapter in adapters.items():  # load_state_dict: also the adapters' extra state
        adapter.load_state_dict({key: tensors[f"{name}.{key}"] for key in adapter.state_dict()})
