"""Model-level API: put adapters into a model, merge, unload, save and load them.

The configs of a model's adapters live in ``model.tensor_peft_configs`` (adapter name ->
config, with ``target_modules`` resolved to the adapted module names). One module per
concern: ``targeting`` (which modules a config selects), ``injection`` (adding, switching
and deleting adapters), ``merging`` (merge, unmerge, unload), ``files`` (save and load)
and ``kbit_training`` (preparing a model with quantized layers)."""

from .files import (
    CONFIG_FILE, CURRENT_LINK, VERSION_PREFIX, WEIGHTS_FILE, load_adapter, load_adapter_weights, save_adapter,
)  # fmt: skip
from .injection import METHODS, delete_adapter, inject, set_adapter, trainable_parameter_count
from .kbit_training import prepare_for_kbit_training
from .merging import merge, unload, unmerge
from .targeting import ALL_LINEAR, adapter_layers

__all__ = [
    "ALL_LINEAR", "CONFIG_FILE", "CURRENT_LINK", "METHODS", "VERSION_PREFIX", "WEIGHTS_FILE", "adapter_layers",
    "delete_adapter", "inject", "load_adapter", "load_adapter_weights", "merge", "prepare_for_kbit_training",
    "save_adapter", "set_adapter", "trainable_parameter_count", "unload", "unmerge",
]  # fmt: skip
