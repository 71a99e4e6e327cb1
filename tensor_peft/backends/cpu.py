"""The ``cpu`` backend: C++17/OpenMP kernels of the compiled extension ``tensor_peft._C``.

Tensors reach the kernels as raw pointers: the op layer has checked their shapes and
made them contiguous float32/float64 on one device. Ops without a kernel here are
reported by the registry as not implemented.

Tucker (FLoRA): every mode but the first is contracted into the core first,
R = G ×_1 U_1 ×_2 U_2 … (r0 × the weight's other modes, never larger than the weight),
so ΔW = s·U_0·R; the kernels make one pass over the rows of W0 (forward) or of Γ
(backward: dU_0 and dR). dG and the other dU_k are the Tucker gradients of R, small."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .registry import extension_import_error

DEVICE_TYPES = ("cpu",)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def unavailable_reason(device_type: str) -> str | None:
    return extension_import_error("_C")


def _kernel(name: str, dtype: torch.dtype):
    from tensor_peft import _C

    return getattr(_C, f"{name}_{_SUFFIX[dtype]}")


def _other_modes(core: Tensor, factors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """R = G ×_1 U_1 ×_2 U_2 … (mode 0 left alone), and the factors that give it."""
    factors_of_R = [torch.eye(core.shape[0], dtype=core.dtype, device=core.device), *factors[1:]]
    return reference.tucker_delta(core, factors_of_R, 1.0).contiguous(), factors_of_R


def _tucker_forward(weight: Tensor | None, core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    R, _ = _other_modes(core, factors)
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
    R, factors_of_R = _other_modes(core, factors)
    d0, r0 = factors[0].shape
    d_U0, d_R = torch.empty_like(factors[0]), torch.empty_like(R)
    _kernel("tucker_backward", core.dtype)(
        grad.data_ptr(), factors[0].data_ptr(), R.data_ptr(), d0, r0, R[0].numel(), scale,
        d_U0.data_ptr(), d_R.data_ptr(),
    )  # fmt: skip
    d_core, _, *d_others = reference.tucker_delta_backward(d_R, core, factors_of_R, 1.0)
    return [d_core, d_U0, *d_others]
