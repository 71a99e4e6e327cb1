"""Adapter layers: each wraps a frozen ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``
and is a drop-in replacement for it."""

from .base import Adapter, AdapterLayer
from .layer_kinds import SUPPORTED_LAYERS
from .flora import FLoRALayer
from .liera import LieRALayer
from .lora import LoRALayer
from .mtlora import MTLoRALayer
from .snell import SNELLALayer, SNELLLayer

__all__ = ["Adapter", "AdapterLayer", "FLoRALayer", "LieRALayer", "LoRALayer", "MTLoRALayer", "SNELLALayer", "SNELLLayer",
           "SUPPORTED_LAYERS"]
