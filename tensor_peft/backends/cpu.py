"""The ``cpu`` backend: C++17/OpenMP kernels of the compiled extension ``tensor_peft._C``.

Tensors reach the kernels as raw pointers: the op layer has checked their shapes and
made them contiguous float32/float64 on one device. Ops without a kernel here are
reported by the registry as not implemented.

Tucker (FLoRA): one pass over W0 or Γ after the split of ``tucker_split``."""

from __future__ import annotations

from .registry import extension_import_error, extension_kernel
from .tucker_split import tucker_ops

DEVICE_TYPES = ("cpu",)


def unavailable_reason(device_type: str) -> str | None:
    return extension_import_error("_C")


def _launch_forward(out, weight, U0, R, d0, r0, n, scale):
    pointer = 0 if weight is None else weight.data_ptr()
    extension_kernel("_C", "tucker_forward", out.dtype)(out.data_ptr(), pointer, U0.data_ptr(), R.data_ptr(), d0, r0, n, scale)


def _launch_backward(grad, U0, R, d_U0, d_R, d0, r0, n, scale):
    extension_kernel("_C", "tucker_backward", grad.dtype)(
        grad.data_ptr(), U0.data_ptr(), R.data_ptr(), d0, r0, n, scale, d_U0.data_ptr(), d_R.data_ptr()
    )


tucker_delta, tucker_merge, tucker_delta_backward = tucker_ops(_launch_forward, _launch_backward)
