"""Adapters in peft's LoRA format, so that they can be served wherever peft LoRA adapters
are, and peft LoRA adapters loaded here.

Export writes an adapter whose update is exactly a rank-r product ΔW = scale·B·A
(``AdapterLayer.low_rank_form``: LoRA; MTLoRA with T folded into A; FLoRA with every mode
but the first folded into A), the scale carried by ``lora_alpha`` (peft's scale is
lora_alpha / r), per-module ranks and scales by ``rank_pattern`` / ``alpha_pattern``.
Import reads a peft LoRA adapter as a tensor_peft LoRA adapter; options peft has and
LoRA here does not (DoRA, LoRA bias, layer selection, per-module ranks) raise.

Both ways refuse, naming the layer and the option, a conv whose update peft computes
otherwise than its base layer does (``check_peft_computes_alike``): peft's update conv pads
with zeros, has no dilation, and its A mixes every input channel."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .config import LoRAConfig
from .nn import AdapterLayer
from .nn.attention import AdaptedMultiheadAttention

PREFIX = "base_model.model."
MODULES_TO_SAVE = "modules_to_save"  # the key prefix of those modules' tensors in tensor_peft's files
# peft config fields that change the math and that LoRA here does not have
_UNSUPPORTED = ("use_dora", "lora_bias", "layers_to_transform", "layers_pattern", "target_parameters",
                "trainable_token_indices", "layer_replication", "use_qalora", "alora_invocation_tokens")  # fmt: skip


def is_peft_config(saved: dict[str, Any]) -> bool:
    return "peft_type" in saved


def export_tensors(model: nn.Module, layers: dict[str, AdapterLayer], adapter_name: str, modules_to_save: list[str],
                   module_tensors: dict[str, Tensor]) -> tuple[dict, dict]:  # fmt: skip
    """(peft's adapter_config.json fields, its safetensors tensors) for the adapter's layers
    and its ``modules_to_save`` (their tensors keyed ``<module>.<key>``)."""
    tensors = {f"{PREFIX}{key}": value for key, value in module_tensors.items()}
    ranks, alphas, conv1d = {}, {}, False
    for name, layer in layers.items():
        if isinstance(model.get_submodule(name.rpartition(".")[0]), AdaptedMultiheadAttention):
            raise ValueError(f"module {name!r}: an nn.MultiheadAttention projection has no peft LoRA form here")
        check_peft_computes_alike(name, layer.base_layer)
        try:
            down, up, scale = layer.low_rank_form(layer.adapters[adapter_name])
        except ValueError as error:
            raise ValueError(f"module {name!r}: {error}") from None
        r = up.shape[1]
        down, up = down.detach().float().cpu().contiguous(), up.detach().float().cpu().contiguous()
        if layer.is_embedding:
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = down
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = up
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = down
            tensors[f"{PREFIX}{name}.lora_B.weight"] = up.reshape(*up.shape, *[1] * (down.dim() - 2))
        conv1d |= layer.kind == "linear" and not isinstance(layer.base_layer, nn.Linear)
        ranks[name], alphas[name] = r, scale * r
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(layers),
        "rank_pattern": {name: k for name, k in ranks.items() if k != r},
        "alpha_pattern": {name: a for name, a in alphas.items() if a != alpha},
        "fan_in_fan_out": conv1d,
        "modules_to_save": modules_to_save or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": None,
        "inference_mode": True,
    }
    return config, tensors


def check_peft_computes_alike(name: str, module: nn.Module) -> None:
    """Raises, naming module ``name`` and the option, where peft's LoRA update on
    ``module`` differs from the one here (which runs with the base conv's geometry)."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return
    if module.padding_mode != "zeros":
        reason = f"padding_mode={module.padding_mode!r}: peft's LoRA pads its update with zeros"
    elif any(d != 1 for d in module.dilation):
        reason = f"dilation={module.dilation}: peft's LoRA runs its update without dilation"
    elif module.groups != 1:
        reason = f"groups={module.groups}: peft's LoRA A mixes every input channel instead of each group's"
    else:
        return
    raise ValueError(f"module {name!r}: {reason}, so peft would compute this adapter differently")


def _most_common(values):
    values = list(values)
    return max(values, key=values.count)


def import_config(saved: dict[str, Any], tensors: dict[str, Tensor], file: str,
                  weights_file: str) -> tuple[LoRAConfig, dict[str, Tensor]]:  # fmt: skip
    """A LoRA config and tensor_peft's tensors (``<module>.lora_A`` / ``.lora_B``, and
    ``modules_to_save.<module>.<key>``) for a peft LoRA adapter (its config read from
    ``file``, its tensors from ``weights_file``); a ValueError naming the field and the
    file for what LoRA here cannot hold or what is malformed."""
    if saved.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type {saved.get('peft_type')!r} cannot be loaded; only peft's LORA can")
    for field in _UNSUPPORTED:
        if saved.get(field) not in (None, False, {}, []):
            raise ValueError(f"{file}: {field}={saved[field]!r} has no equivalent in tensor_peft's LoRA")
    to_save = list(saved.get("modules_to_save") or [])
    ours = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{file}: tensor {key!r} is not a peft LoRA tensor")
        key = key[len(PREFIX):]
        name, _, part = key.rpartition(".lora_")
        kind = {"A.weight": "lora_A", "B.weight": "lora_B", "embedding_A": "lora_A", "embedding_B": "lora_B"}.get(part)
        if name and kind:
            ours[f"{name}.{kind}"] = value.flatten(1) if kind == "lora_B" else value  # a conv B is (out, r, 1, …)
        elif any(key.startswith(module + ".") for module in to_save):
            ours[f"{MODULES_TO_SAVE}.{key}"] = value
        else:
            raise ValueError(f"{file}: tensor {key!r} is neither a LoRA factor nor of modules_to_save")
    names = sorted(key.rpartition(".")[0] for key in ours if key.endswith(".lora_A"))
    if not names:
        raise ValueError(f"{weights_file} holds no LoRA tensors (a module's lora_A and lora_B)")
    alpha_pattern, scales = saved.get("alpha_pattern") or {}, set()
    for name in names:
        r = ours[f"{name}.lora_A"].shape[0]
        key = _pattern_key(alpha_pattern, name)
        if key is None:
            alpha = _number(saved.get("lora_alpha", 8), "lora_alpha", file)
        else:
            alpha = _number(alpha_pattern[key], f"alpha_pattern[{key!r}]", file)
        scales.add((r, alpha * math.sqrt(r) if saved.get("use_rslora") else alpha))  # rsLoRA: alpha/√r
    if len(scales) != 1:
        raise ValueError(f"{file}: modules differ in rank or lora_alpha ({sorted(scales)}); tensor_peft's LoRA has one of each")
    ((r, alpha),) = scales
    dropout = _number(saved.get("lora_dropout") or 0.0, "lora_dropout", file)
    config = LoRAConfig(target_modules=names, r=r, alpha=alpha, dropout=dropout, modules_to_save=to_save or None)
    return config, ours


def _number(value: Any, field: str, file: str) -> float:
    """Config ``field``'s ``value`` as a float; a ValueError naming the field and the file
    unless it is a JSON number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{file}: {field} must be a number, got {value!r}")
    return float(value)


def _pattern_key(pattern: dict[str, Any], name: str) -> str | None:
    """The key of peft's per-module override for module ``name``: equal to the name or a
    dotted suffix of it; None when no key is."""
    return next((key for key in pattern if name == key or name.endswith("." + key)), None)
