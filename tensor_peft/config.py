"""Adapter configurations (dataclasses), one per method, for ``tensor_peft.inject``.

Common fields: ``target_modules`` (a list of module names, each matching the full name
or a dotted suffix; a regex string matched against the full name; or module types),
``exclude_modules`` (same forms), ``r`` (rank), ``dropout`` (on the adapter's input)
and ``dtype`` (of the adapter parameters; ``None``: float32 over a float16/bfloat16
base, else the base weight's dtype)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch

from .nn.base import check_dropout
from .ops._common import check_real
from .nn.lora import check_alpha, check_rank
from .nn.flora import MODES as FLORA_MODES
from .nn.liera import EXP_FORMS, GROUPS, INNERS
from .nn.mtlora import VARIANTS

ModuleSpec = Union[str, type, Sequence[Union[str, type]], None]


@dataclass
class AdapterConfig:
    method: ClassVar[str] = ""

    target_modules: ModuleSpec = None
    exclude_modules: ModuleSpec = None
    r: int = 8
    dropout: float = 0.0
    dtype: str | None = None

    def __post_init__(self):
        if self.target_modules is None or (
            not isinstance(self.target_modules, (str, type)) and len(self.target_modules) == 0
        ):
            raise ValueError("target_modules must name the modules to adapt (names, a regex, or types)")
        check_rank(self.r)
        check_dropout(self.dropout)
        if self.dtype is not None and not isinstance(getattr(torch, str(self.dtype), None), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype such as 'float32', got {self.dtype!r}")

    def layer_options(self) -> dict[str, Any]:
        """The keyword arguments of the layer's ``add_adapter`` this config gives."""
        skip = {"target_modules", "exclude_modules"}
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        options["dtype"] = getattr(torch, self.dtype) if self.dtype else None
        return options


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: ΔW = (alpha/r)·B·A (peft's math and init)."""

    method: ClassVar[str] = "lora"
    alpha: float = 8.0

    def __post_init__(self):
        super().__post_init__()
        check_alpha(self.alpha)


@dataclass
class MTLoRAConfig(LoRAConfig):
    """MTLoRA: ΔW = (alpha/r)·B·T·A with T from ``variant`` (shim, icfm, ctcm, dtsm)."""

    method: ClassVar[str] = "mtlora"
    variant: str = "shim"

    def __post_init__(self):
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {self.variant!r}")


@dataclass
class FLoRAConfig(AdapterConfig):
    """FLoRA: ΔW = scale · G ×_0 U_0 ×_1 U_1 … (Tucker). ``ranks`` overrides the per-mode
    ranks ([r, r] for Linear, [r, r, 2, …] for conv); ``mode``: auto, merged, factorized."""

    method: ClassVar[str] = "flora"
    ranks: list[int] | None = None
    scale: float = 1.0
    mode: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        check_real(self.scale, "scale")
        if self.ranks is not None:
            self.ranks = [check_rank(k, "ranks") for k in self.ranks]
        if self.mode not in FLORA_MODES:
            raise ValueError(f"mode must be one of {', '.join(FLORA_MODES)}; got {self.mode!r}")


@dataclass
class LieRAConfig(AdapterConfig):
    """LieRA: W_eff = W0 ⊙ exp(ΔW) (``group="hadamard"``, ΔW from ``inner`` lora with
    s = alpha/r, or flora with ``scale``/``ranks``; ``exp`` exact or taylor1), or
    W_eff = blockdiag(exp(S_i))·W0 (``group`` orthogonal or gl, blocks of ``block_size``)."""

    method: ClassVar[str] = "liera"
    alpha: float = 8.0
    group: str = "hadamard"
    inner: str = "lora"
    exp: str = "exact"
    block_size: int = 4
    scale: float = 1.0
    ranks: list[int] | None = None

    def __post_init__(self):
        super().__post_init__()
        check_alpha(self.alpha)
        check_real(self.scale, "scale")
        check_rank(self.block_size, "block_size")
        for value, name, choices in ((self.group, "group", GROUPS), (self.inner, "inner", INNERS),
                                     (self.exp, "exp", EXP_FORMS)):  # fmt: skip
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
