"""The ``cpu`` backend: C++17/OpenMP kernels of the compiled extension ``tensor_peft._C``.

Tensors reach the kernels as raw pointers: the op layer has checked their shapes and
made them contiguous float32/float64 on one device. Ops without a kernel here are
reported by the registry as not implemented.

Tucker (FLoRA): the spatial modes are first contracted into the core, a small tensor
S = G ×_{k≥2} U_k of size r0·r1·prod(spatial); the kernels then make one pass over the
rows of W0 (forward) or of Γ (backward). What is left of the backward is small: dG and
the spatial dU_k are the Tucker gradients of the small problem with Γ replaced by
Z = Γ ×_0 U0ᵀ ×_1 U1ᵀ (r0·r1·prod(spatial)), which the kernel accumulates."""

from __future__ import annotations

import math

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


def _spatial_core(core: Tensor, factors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """S = G ×_{k≥2} U_k, and the identity factors that leave modes 0 and 1 alone."""
    identities = [torch.eye(r, dtype=core.dtype, device=core.device) for r in core.shape[:2]]
    return reference.tucker_delta(core, identities + factors[2:], 1.0).contiguous(), identities


def _tucker_forward(weight: Tensor | None, core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    S, _ = _spatial_core(core, factors)
    dims = [f.shape[0] for f in factors]
    out = torch.empty(dims, dtype=core.dtype, device=core.device)
    r0, r1 = core.shape[:2]
    _kernel("tucker_forward", core.dtype)(
        out.data_ptr(), 0 if weight is None else weight.data_ptr(), S.data_ptr(),
        factors[0].data_ptr(), factors[1].data_ptr(), dims[0], dims[1], r0, r1, math.prod(dims[2:]), scale,
    )  # fmt: skip
    return out


def tucker_delta(core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    return _tucker_forward(None, core, factors, scale)


def tucker_merge(weight: Tensor, core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    return _tucker_forward(weight, core, factors, scale)


def tucker_delta_backward(grad: Tensor, core: Tensor, factors: list[Tensor], scale: float) -> list[Tensor]:
    S, identities = _spatial_core(core, factors)
    dims = [f.shape[0] for f in factors]
    r0, r1 = core.shape[:2]
    Z = torch.empty(r0, r1, *dims[2:], dtype=core.dtype)
    d_U0, d_U1 = torch.empty_like(factors[0]), torch.empty_like(factors[1])
    _kernel("tucker_backward", core.dtype)(
        grad.data_ptr(), S.data_ptr(), factors[0].data_ptr(), factors[1].data_ptr(),
        dims[0], dims[1], r0, r1, math.prod(dims[2:]), scale, Z.data_ptr(), d_U0.data_ptr(), d_U1.data_ptr(),
    )  # fmt: skip
    d_core, _, _, *d_spatial = reference.tucker_delta_backward(Z, core, identities + factors[2:], scale)
    return [d_core, d_U0, d_U1, *d_spatial]
