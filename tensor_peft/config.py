"""Adapter configurations (dataclasses), one per method, for ``tensor_peft.inject``.

Common fields: ``target_modules`` (a list of module names, each matching the full name
or a dotted suffix; a regex string matched against the full name; module types; or
"all-linear"), ``exclude_modules`` (same forms), ``modules_to_save`` (names of modules
trained whole alongside the adapter, such as a classifier head, and saved with it),
``r`` (rank), ``dropout`` (on the adapter's input)
and ``dtype`` (of the adapter parameters; ``None``: float32 over a float16/bfloat16
base, else the base weight's dtype).

It also holds what the layers, ops and backends share about options: the choices each
takes (``KERNELS``, ``MODES``, …) and the checks of their values. It imports nothing from
tensor_peft, so that every part of the package can import it."""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch

# The choices each option takes.
KERNELS = ("piecewise_linear", "rbf", "sigmoid", "linear", "mixture")
"""SNELL's kernel functions κ; the native kernels number them by their place here."""
MODES = ("hard", "soft")
"""How ``sparsify`` scales the entries it keeps."""
THRESHOLDS = ("count", "quantile")
"""How ``sparsify`` turns a sparsity into the number of entries dropped."""
EXP_FORMS = ("exact", "taylor1")
"""LieRA's exponential: exp(ΔW), or its first-order Taylor form 1 + ΔW."""
VARIANTS = ("shim", "icfm", "ctcm", "dtsm")
"""MTLoRA's transformation T."""
GROUPS = ("hadamard", "orthogonal", "gl")
"""LieRA's group."""
INNERS = ("lora", "flora")
"""The method giving LieRA's ΔW in the Hadamard group."""
SIDES = ("output", "input")
"""The side of the weight LieRA's matrix groups act on."""
EXECUTIONS = ("auto", "merged", "factorized")
"""How a FLoRA layer runs its update."""
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (*HALF_DTYPES, torch.float32, torch.float64)


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_real(value: object, name: str) -> float:
    """``value`` as a finite Python float, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an integer too large for a float") from None
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value}")
    return result


def check_rank(r: object, name: str = "r") -> int:
    """``r`` as a positive int, or a ValueError naming ``name``."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"{name} must be a positive integer, got {r!r}")
    return int(r)


def check_dropout(dropout: object) -> float:
    """``dropout`` as a float probability in [0, 1), or a ValueError."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    return float(dropout)


def check_chunks(chunks: object, r: int) -> int:
    """SNELL's number of chunks H: a positive divisor of the rank ``r``."""
    chunks = check_rank(chunks, "chunks")
    if r % chunks:
        raise ValueError(f"chunks ({chunks}) must divide the rank r ({r})")
    return chunks


def check_sparsity(sparsity: object) -> float:
    """``sparsity``, the fraction of entries zeroed, as a float in [0, 1], or a TypeError/ValueError."""
    sparsity = check_real(sparsity, "sparsity")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1] (the fraction of entries zeroed), got {sparsity}")
    return sparsity


ModuleSpec = Union[str, type, Sequence[Union[str, type]], None]


def check_module_spec(spec: object, name: str) -> None:
    """``spec`` as ``target_modules`` takes it: a regex string, a module type, or a list of
    names and types; else a TypeError/ValueError naming ``name``."""
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as error:
            raise ValueError(f"{name} {spec!r} is not a valid regular expression: {error}") from None
        return
    if isinstance(spec, type):
        return
    if not isinstance(spec, Sequence):
        raise TypeError(f"{name} must be a regex string, a module type or a list of names and types, got {spec!r}")
    for item in spec:
        if not isinstance(item, (str, type)):
            raise TypeError(f"{name} entries must be module names (str) or module types, got {item!r}")


@dataclass
class AdapterConfig:
    method: ClassVar[str] = ""
    renamed_fields: ClassVar[dict[str, str]] = {}
    """Earlier names of fields (earlier name -> name) that saved configs may carry."""

    target_modules: ModuleSpec = None
    exclude_modules: ModuleSpec = None
    modules_to_save: list[str] | None = None
    r: int = 8
    dropout: float = 0.0
    dtype: str | None = None

    def __post_init__(self):
        if self.target_modules is None or (
            not isinstance(self.target_modules, (str, type)) and len(self.target_modules) == 0
        ):
            raise ValueError("target_modules must name the modules to adapt (names, a regex, or types)")
        check_module_spec(self.target_modules, "target_modules")
        if self.exclude_modules is not None:
            check_module_spec(self.exclude_modules, "exclude_modules")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        check_rank(self.r)
        check_dropout(self.dropout)
        if self.dtype is not None and getattr(torch, str(self.dtype), None) not in FLOAT_DTYPES:
            raise ValueError(f"dtype must name a floating torch dtype such as 'float32', got {self.dtype!r}")

    @classmethod
    def renamed(cls, fields: dict[str, Any], given_by: str) -> tuple[dict[str, Any], list[str]]:
        """``fields`` with each earlier name (``renamed_fields``) read as its name, and the
        earlier names found; a ValueError where ``given_by`` gives both names."""
        fields, found = dict(fields), []
        for earlier, name in cls.renamed_fields.items():
            if earlier in fields:
                if name in fields:
                    raise ValueError(f"{given_by} gives both {name!r} and {earlier!r}, its earlier name")
                fields[name] = fields.pop(earlier)
                found.append(earlier)
        return fields, found

    @classmethod
    def from_saved(cls, fields: dict[str, Any]) -> AdapterConfig:
        """The config saved as ``fields``, reading a field's earlier name as its name."""
        return cls(**cls.renamed(fields, "the saved config")[0])

    def layer_options(self) -> dict[str, Any]:
        """The keyword arguments of the layer's ``add_adapter`` this config gives."""
        skip = {"target_modules", "exclude_modules", "modules_to_save"}
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        options["dtype"] = getattr(torch, self.dtype) if self.dtype else None
        return options


def accepting_earlier_names(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """``cls`` whose constructor also takes its fields' earlier names (``renamed_fields``)
    for one minor version, with a DeprecationWarning naming the new one."""
    init = cls.__init__

    def __init__(self, *args, **kwargs):
        kwargs, found = cls.renamed(kwargs, cls.__name__)
        for earlier in found:
            warnings.warn(
                f"{cls.__name__}({earlier}=...) is deprecated and will be removed in tensor_peft 0.2: "
                f"use {cls.renamed_fields[earlier]}=...",
                DeprecationWarning,
                stacklevel=2,
            )
        init(self, *args, **kwargs)

    __init__.__doc__, __init__.__signature__ = init.__doc__, inspect.signature(init)
    cls.__init__ = __init__
    return cls


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: ΔW = (alpha/r)·B·A (peft's math and init)."""

    method: ClassVar[str] = "lora"
    alpha: float = 8.0

    def __post_init__(self):
        super().__post_init__()
        check_real(self.alpha, "alpha")


@dataclass
class MTLoRAConfig(LoRAConfig):
    """MTLoRA: ΔW = (alpha/r)·B·T·A with T from ``variant`` (shim, icfm, ctcm, dtsm)."""

    method: ClassVar[str] = "mtlora"
    variant: str = "shim"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self.variant, "variant", VARIANTS)


@accepting_earlier_names
@dataclass
class FLoRAConfig(AdapterConfig):
    """FLoRA: ΔW = scale · G ×_0 U_0 ×_1 U_1 … (Tucker). ``ranks`` overrides the per-mode
    ranks ([r, r] for Linear, [r, r, 2, …] for conv); ``execution``: auto, merged, factorized.
    ``mode``, this option's earlier name, is read as ``execution`` from saved configs, and
    accepted by the constructor until 0.2 with a DeprecationWarning."""

    method: ClassVar[str] = "flora"
    renamed_fields: ClassVar[dict[str, str]] = {"mode": "execution"}
    ranks: list[int] | None = None
    scale: float = 1.0
    execution: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        check_real(self.scale, "scale")
        if self.ranks is not None:
            self.ranks = [check_rank(k, "ranks") for k in self.ranks]
        check_choice(self.execution, "execution", EXECUTIONS)


@dataclass
class LieRAConfig(AdapterConfig):
    """LieRA: W_eff = W0 ⊙ exp(ΔW) (``group="hadamard"``, ΔW from ``inner`` lora with
    s = alpha/r, or flora with ``scale``/``ranks``; ``exp`` exact or taylor1), or
    W_eff = blockdiag(exp(S_i))·W0 (``group`` orthogonal or gl, blocks of ``block_size``;
    ``side="input"``: W0·blockdiag(exp(S_i)) on the inputs)."""

    method: ClassVar[str] = "liera"
    alpha: float = 8.0
    group: str = "hadamard"
    inner: str = "lora"
    exp: str = "exact"
    block_size: int = 4
    side: str = "output"
    scale: float = 1.0
    ranks: list[int] | None = None

    def __post_init__(self):
        super().__post_init__()
        check_real(self.alpha, "alpha")
        check_real(self.scale, "scale")
        check_rank(self.block_size, "block_size")
        check_choice(self.group, "group", GROUPS)
        check_choice(self.inner, "inner", INNERS)
        check_choice(self.exp, "exp", EXP_FORMS)
        check_choice(self.side, "side", SIDES)


@dataclass
class KernelizedConfig(AdapterConfig):
    """What SNELL and SNELLA share: rank ``r`` embeddings in ``chunks`` chunks, the kernel
    function κ ``kernel`` (piecewise_linear, rbf, sigmoid, linear, mixture), ``mode`` (hard,
    soft), ``learnable_coeff`` (train piecewise's chunk coefficients) and ``threshold``, the rule
    that turns a sparsity s into the number of entries dropped from n: ``count``
    (ceil(s·n)) or ``quantile`` (the released code's ``|ΔW| > torch.quantile(|ΔW|, s)``:
    floor(s·(n − 1)) + 1, see ``ops.sparsify``)."""

    kernel: str = "piecewise_linear"
    mode: str = "hard"
    chunks: int = 2
    learnable_coeff: bool = False
    threshold: str = "count"

    def __post_init__(self):
        super().__post_init__()
        check_chunks(self.chunks, self.r)
        check_choice(self.kernel, "kernel", KERNELS)
        check_choice(self.mode, "mode", MODES)
        check_choice(self.threshold, "threshold", THRESHOLDS)


@dataclass
class SNELLConfig(KernelizedConfig):
    """SNELL: ΔW = sparsify(κ(Out, In), sparsity, mode), ``sparsity`` the fraction zeroed;
    ``sparsity=None``: ΔW = κ(Out, In), the released code's kernelized LoRA, unsparsified."""

    method: ClassVar[str] = "snell"
    sparsity: float | None = 0.9

    def __post_init__(self):
        super().__post_init__()
        if self.sparsity is not None:
            check_sparsity(self.sparsity)


@dataclass
class SNELLAConfig(KernelizedConfig):
    """SNELLA: the ``mixture`` kernel function and per-layer sparsities set during training by
    ``SparsityAllocator`` (call its ``step()`` after every optimizer step).

    Layers start at ``init_sparsity``. The total non-zero budget follows the paper's cubic
    schedule from that of ``init_sparsity`` to that of ``target_sparsity`` between step
    ``warmup_steps`` and step ``total_steps - final_steps``, and is reallocated across
    layers by importance every ``interval`` steps (importance EMAs with ``beta1``, ``beta2``).

    Every layer keeps at least ``min_keep`` of its entries (rounded up, at least 1) at
    every reallocation, the rest of the budget going by importance: a layer whose
    importance is 0 (no entry kept, so no gradient) would otherwise stay off for good.
    The default 0.01 is a tenth of the average share at the default target 0.9; the
    released code has no floor (``min_keep=0`` still keeps 1 entry per layer)."""

    method: ClassVar[str] = "snella"
    kernel: str = "mixture"
    init_sparsity: float = 0.5
    target_sparsity: float = 0.9
    total_steps: int = 1000
    warmup_steps: int = 0
    final_steps: int = 0
    interval: int = 10
    beta1: float = 0.85
    beta2: float = 0.85
    min_keep: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        check_sparsity(self.init_sparsity)
        check_sparsity(self.target_sparsity)
        if not 0.0 <= check_real(self.min_keep, "min_keep") <= 1.0:
            raise ValueError(f"min_keep must be in [0, 1] (a fraction of each layer's entries), got {self.min_keep!r}")
        check_rank(self.total_steps, "total_steps")
        check_rank(self.interval, "interval")
        for name in ("warmup_steps", "final_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.warmup_steps + self.final_steps >= self.total_steps:
            raise ValueError(
                f"warmup_steps + final_steps ({self.warmup_steps} + {self.final_steps}) must be "
                f"below total_steps ({self.total_steps})"
            )
        for name in ("beta1", "beta2"):
            if not 0.0 <= check_real(getattr(self, name), name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")

    def layer_options(self) -> dict[str, Any]:
        """The layer's options: layers start at ``init_sparsity``; the schedule is the allocator's."""
        schedule = ("init_sparsity", "target_sparsity", "total_steps", "warmup_steps", "final_steps",
                    "interval", "beta1", "beta2", "min_keep")  # fmt: skip
        options = {k: v for k, v in super().layer_options().items() if k not in schedule}
        return {**options, "sparsity": self.init_sparsity}
