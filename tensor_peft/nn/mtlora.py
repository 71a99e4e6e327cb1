"""MTLoRA: LoRA with a learned r×r transformation T inside the subspace, ΔW = s·B·T·A.

Variants: ``shim`` T = C; ``icfm`` T = C·Cᵀ; ``ctcm`` T = C·D; ``dtsm`` T = C + D. Init
T = I (``shim``/``icfm``: C = I; ``ctcm``: C = D = I; ``dtsm``: C = I, D = 0), A
kaiming-uniform(a=√5), B = 0. (Starting from C = D = 0, as the authors' LLaVA code
does, is a dead stationary point for icfm and ctcm.) T is folded into A each step
(T·A is r × in_features, cheaper than an extra r→r pass over the activations)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import VARIANTS, check_choice
from .base import Adapter
from .lora import LoRAAdapter, LowRankLayer


class MTLoRAAdapter(LoRAAdapter):
    def __init__(self, layer, r, alpha, dropout, dtype, variant: str):
        super().__init__(layer, r, alpha, dropout, dtype)
        self.variant = check_choice(variant, "variant", VARIANTS)
        factory = dict(dtype=self.lora_A.dtype, device=self.lora_A.device)
        self.C = nn.Parameter(torch.eye(self.r, **factory))
        if variant == "ctcm":
            self.D = nn.Parameter(torch.eye(self.r, **factory))
        elif variant == "dtsm":
            self.D = nn.Parameter(torch.zeros(self.r, self.r, **factory))

    def transform(self) -> Tensor:
        """T for this variant."""
        if self.variant == "shim":
            return self.C
        if self.variant == "icfm":
            return self.C @ self.C.T
        if self.variant == "ctcm":
            return self.C @ self.D
        return self.C + self.D


class MTLoRALayer(LowRankLayer):
    """A frozen Linear/Conv1d/Conv2d/Conv3d with MTLoRA adapters (drop-in replacement)."""

    method = "mtlora"

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        alpha: float = 8.0,
        variant: str = "shim",
        dropout: float = 0.0,
        adapter_name: str = "default",
        dtype: torch.dtype | None = None,
    ):
        super().__init__(
            base_layer, adapter_name, r=r, alpha=alpha, variant=variant, dropout=dropout, dtype=dtype
        )

    def _new_adapter(self, **options) -> Adapter:
        return MTLoRAAdapter(self, **options)

    def down_projection(self, adapter: Adapter) -> Tensor:
        A = adapter.lora_A
        return (adapter.transform() @ A.reshape(adapter.r, -1)).reshape(A.shape)
