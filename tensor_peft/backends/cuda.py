"""The ``cuda`` backend: CUDA C++ kernels of the compiled extension ``tensor_peft._cuda``.

Tensors reach the kernels as raw device pointers with the current CUDA stream as an
integer; the op layer has checked their shapes and made them contiguous float32/float64
on one device. Kernels: ΔW = s·U·R updates with an add / exp / taylor1 epilogue, one pass
over W0 or Γ (``csrc/cuda/lowrank.cu``): the Tucker ops after the split of
``tucker_split`` and LieRA's ``lowrank_hadamard_merge``; and ``matrix_exp`` with its
backward (one thread per matrix, the math of the CPU kernel). The registry reports the
others as not implemented."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import extension_import_error, extension_kernel
from .tucker_split import hadamard_ops, tucker_ops

DEVICE_TYPES = ("cuda",)


def unavailable_reason(device_type: str) -> str | None:
    return extension_import_error("_cuda")


def _stream(tensor: Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


_EPILOGUE = {"add": 0, "exact": 1, "taylor1": 2}


def _forward(out, weight, U, R, d0, r0, n, scale, epilogue="add"):
    with torch.cuda.device(out.device):
        extension_kernel("_cuda", "lowrank_forward", out.dtype)(
            out.data_ptr(), 0 if weight is None else weight.data_ptr(), U.data_ptr(), R.data_ptr(), d0, r0, n, scale,
            _EPILOGUE[epilogue], _stream(out),
        )  # fmt: skip


def _backward(grad, weight, U, R, d_U, d_R, d0, r0, n, scale, epilogue="add"):
    with torch.cuda.device(grad.device):
        extension_kernel("_cuda", "lowrank_backward", grad.dtype)(
            grad.data_ptr(), 0 if weight is None else weight.data_ptr(), U.data_ptr(), R.data_ptr(), d0, r0, n, scale,
            _EPILOGUE[epilogue], d_U.data_ptr(), d_R.data_ptr(), _stream(grad),
        )  # fmt: skip


tucker_delta, tucker_merge, tucker_delta_backward = tucker_ops(_forward, _backward)
lowrank_hadamard_merge, lowrank_hadamard_merge_backward = hadamard_ops(_forward, _backward)


def _expm_launch(name, A, *pointers, extra_per_matrix):
    """Runs ``matrix_exp[_backward]`` over A's matrices with a workspace of
    20n² (+ ``extra_per_matrix``) values and n pivots per matrix."""
    n = A.shape[-1]
    batch = A.numel() // (n * n) if n else 0
    work = A.new_empty(batch * (20 * n * n + extra_per_matrix))
    pivots = torch.empty(batch * n, dtype=torch.int32, device=A.device)
    with torch.cuda.device(A.device):
        extension_kernel("_cuda", name, A.dtype)(*pointers, batch, n, work.data_ptr(), pivots.data_ptr(), _stream(A))


def matrix_exp(A: Tensor) -> Tensor:
    out = torch.empty_like(A)
    _expm_launch("matrix_exp", A, out.data_ptr(), A.data_ptr(), extra_per_matrix=0)
    return out


def matrix_exp_backward(grad: Tensor, A: Tensor) -> Tensor:
    d_A = torch.empty_like(A)
    n = A.shape[-1]
    _expm_launch("matrix_exp_backward", A, d_A.data_ptr(), grad.data_ptr(), A.data_ptr(), extra_per_matrix=3 * n * n)
    return d_A
