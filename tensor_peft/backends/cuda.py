"""The ``cuda`` backend: CUDA C++ kernels of the compiled extension ``tensor_peft._cuda``.

Tensors reach the kernels as raw device pointers with the current CUDA stream as an
integer; the op layer has checked their shapes and made them contiguous float32/float64
on one device. Kernels: the Tucker ops (one pass over W0 or Γ after the split of
``tucker_split``); the registry reports the others as not implemented."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import extension_import_error, extension_kernel
from .tucker_split import tucker_ops

DEVICE_TYPES = ("cuda",)


def unavailable_reason(device_type: str) -> str | None:
    return extension_import_error("_cuda")


def _stream(tensor: Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


def _launch_forward(out, weight, U0, R, d0, r0, n, scale):
    pointer = 0 if weight is None else weight.data_ptr()
    with torch.cuda.device(out.device):
        extension_kernel("_cuda", "tucker_forward", out.dtype)(
            out.data_ptr(), pointer, U0.data_ptr(), R.data_ptr(), d0, r0, n, scale, _stream(out)
        )


def _launch_backward(grad, U0, R, d_U0, d_R, d0, r0, n, scale):
    with torch.cuda.device(grad.device):
        extension_kernel("_cuda", "tucker_backward", grad.dtype)(
            grad.data_ptr(), U0.data_ptr(), R.data_ptr(), d_U0.data_ptr(), d_R.data_ptr(), d0, r0, n, scale,
            _stream(grad),
        )  # fmt: skip


tucker_delta, tucker_merge, tucker_delta_backward = tucker_ops(_launch_forward, _launch_backward)
