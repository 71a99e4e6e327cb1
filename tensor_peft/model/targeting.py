"""Which modules an adapter config selects (``target_modules``, ``exclude_modules``,
``modules_to_save``), checked before anything changes, and the weights they share."""

from __future__ import annotations

import re
import warnings

from torch import nn

from ..config import AdapterConfig, ModuleSpec
from ..nn import AdapterLayer
from ..nn.attention import AdaptedMultiheadAttention, projection_weights
from ..nn.layer_kinds import layer_kind

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
