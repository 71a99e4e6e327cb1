"""The ``cpu`` backend: C++17/OpenMP kernels of the compiled extension ``tensor_peft._C``.

Tensors reach the kernels as raw pointers: the op layer has checked their shapes and
made them contiguous float32/float64 on one device. Ops without a kernel here are
reported by the registry as not implemented.

Tucker (FLoRA): one pass over W0 or Γ after the split of ``tucker_split``."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import extension_import_error
from .tucker_split import gradients, split_first_mode

DEVICE_TYPES = ("cpu",)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def unavailable_reason(device_type: str) -> str | None:
    return extension_import_error("_C")


def _kernel(name: str, dtype: torch.dtype):
    from tensor_peft import _C

    return getattr(_C, f"{name}_{_SUFFIX[dtype]}")


def _tucker_forward(weight: Tensor | None, core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    R, _ = split_first_mode(core, factors)
    out = R.new_empty([factors[0].shape[0], *R.shape[1:]])
    d0, r0 = factors[0].shape
    _kernel("tucker_forward", core.dtype)(
        out.data_ptr(), 0 if weight is None else weight.data_ptr(), factors[0].data_ptr(), R.data_ptr(),
        d0, r0, R[0].numel(), scale,
    )  # fmt: skip
    return out


def tucker_delta(core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    return _tucker_forward(None, core, factors, scale)


def tucker_merge(weight: Tensor, core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    return _tucker_forward(weight, core, factors, scale)


def tucker_delta_backward(grad: Tensor, core: Tensor, factors: list[Tensor], scale: float) -> list[Tensor]:
    R, factors_of_R = split_first_mode(core, factors)
    d0, r0 = factors[0].shape
    d_U0, d_R = torch.empty_like(factors[0]), torch.empty_like(R)
    _kernel("tucker_backward", core.dtype)(
        grad.data_ptr(), factors[0].data_ptr(), R.data_ptr(), d0, r0, R[0].numel(), scale,
        d_U0.data_ptr(), d_R.data_ptr(),
    )  # fmt: skip
    return gradients(d_U0, d_R, core, factors_of_R)
