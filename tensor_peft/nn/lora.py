"""LoRA (the baseline, same math and init as ``peft``): ΔW = s·B·A with s = alpha/r.

Linear: A ``(r, d_in)``, B ``(d_out, r)``; an embedding looks its indices up in Aᵀ
(``(num_embeddings, r)``), as peft does, never forming ΔW. Conv: A ``(r, c_in/groups, *kernel)`` applied
as a conv with the base layer's geometry, B ``(c_out, r)`` as a 1×1 conv; with
``groups > 1`` the update runs in merged form (one conv with ΔW). Init: A
kaiming-uniform(a=√5), B = 0, so the layer starts equal to its base."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import check_rank, check_real
from .base import Adapter, AdapterLayer, adapter_dtype_for


class LoRAAdapter(Adapter):
    def __init__(self, layer: AdapterLayer, r: int, alpha: float, dropout: float, dtype: torch.dtype | None):
        super().__init__(dropout)
        self.r = check_rank(r)
        self.alpha = check_real(alpha, "alpha")
        self.scale = self.alpha / self.r
        factory = dict(dtype=adapter_dtype_for(layer.weight, dtype), device=layer.weight.device)
        self.lora_A = nn.Parameter(torch.empty(self.r, *layer.weight.shape[1:], **factory))
        self.lora_B = nn.Parameter(torch.zeros(layer.weight.shape[0], self.r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))


class LowRankLayer(AdapterLayer):
    """What LoRA and MTLoRA share: ΔW = s·B·down, with ``down`` ``(r, *weight.shape[1:])``
    given by ``down_projection`` (A for LoRA, T·A for MTLoRA)."""

    def down_projection(self, adapter: Adapter) -> Tensor:
        raise NotImplementedError

    def low_rank_form(self, adapter: Adapter) -> tuple[Tensor, Tensor, float]:
        return self.down_projection(adapter), adapter.lora_B, adapter.scale

    def delta_weight(self, adapter: Adapter) -> Tensor:
        down = self.down_projection(adapter).to(self.compute_dtype(adapter))
        up = adapter.lora_B.to(down.dtype)
        return adapter.scale * (up @ down.reshape(adapter.r, -1)).reshape(self.weight_shape)

    def delta_forward(self, adapter: Adapter, x: Tensor) -> Tensor:
        if self.is_grouped_conv:
            return super().delta_forward(adapter, x)  # merged form
        dtype = self.compute_dtype(adapter)
        down = self.down_projection(adapter).to(dtype)
        hidden = adapter.scale * self.base_operation(x, down)  # scaled on r channels, not on the output's
        return self.pointwise(hidden, adapter.lora_B.to(dtype))


class LoRALayer(LowRankLayer):
    """A frozen Linear/Conv1d/Conv2d/Conv3d with LoRA adapters (drop-in replacement).

    ``LoRALayer(nn.Linear(64, 32), r=8, alpha=16)`` adds adapter ``"default"``; more
    adapters come from ``add_adapter(name, r=..., alpha=..., dropout=...)``."""

    method = "lora"

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        adapter_name: str = "default",
        dtype: torch.dtype | None = None,
    ):
        super().__init__(base_layer, adapter_name, r=r, alpha=alpha, dropout=dropout, dtype=dtype)

    def _new_adapter(self, **options) -> Adapter:
        return LoRAAdapter(self, **options)

    def down_projection(self, adapter: Adapter) -> Tensor:
        return adapter.lora_A
