"""The ``cpu`` backend: C++17/OpenMP kernels of the compiled extension ``tensor_peft._C``.

Tensors reach the kernels as raw pointers: the op layer has checked their shapes and
made them contiguous float32/float64 on one device. Ops without a kernel here are
reported by the registry as not implemented.

Tucker (FLoRA): one pass over W0 or Γ after the split of ``tucker_split``."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import extension_import_error
from .tucker_split import fused_backward, fused_forward

DEVICE_TYPES = ("cpu",)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def unavailable_reason(device_type: str) -> str | None:
    return extension_import_error("_C")


def _kernel(name: str, dtype: torch.dtype):
    from tensor_peft import _C

    return getattr(_C, f"{name}_{_SUFFIX[dtype]}")


def _launch_forward(out, weight, U0, R, d0, r0, n, scale):
    pointer = 0 if weight is None else weight.data_ptr()
    _kernel("tucker_forward", out.dtype)(out.data_ptr(), pointer, U0.data_ptr(), R.data_ptr(), d0, r0, n, scale)


def _launch_backward(grad, U0, R, d_U0, d_R, d0, r0, n, scale):
    _kernel("tucker_backward", grad.dtype)(
        grad.data_ptr(), U0.data_ptr(), R.data_ptr(), d0, r0, n, scale, d_U0.data_ptr(), d_R.data_ptr()
    )


def tucker_delta(core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    return fused_forward(_launch_forward, None, core, factors, scale)


def tucker_merge(weight: Tensor, core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    return fused_forward(_launch_forward, weight, core, factors, scale)


def tucker_delta_backward(grad: Tensor, core: Tensor, factors: list[Tensor], scale: float) -> list[Tensor]:
    return fused_backward(_launch_backward, grad, core, factors, scale)
