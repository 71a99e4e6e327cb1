"""The ``cpu`` backend: C++17/OpenMP kernels of the compiled extension ``tensor_peft._C``.

Tensors reach the kernels as raw pointers: the op layer has checked their shapes and
made them contiguous float32/float64 on one device. Ops without a kernel here are
reported by the registry as not implemented.

The kernels: ``csrc/cpu/lowrank.cpp`` handles updates ΔW = s·U·R with U, R thin, one
pass over W0 or Γ: the Tucker ops after the split of ``tucker_split`` (U = U_0), and
LieRA's ``lowrank_hadamard_merge`` (U = B, R = A) with its exp / taylor1 epilogue.
``csrc/cpu/expm.cpp`` is the batched ``matrix_exp`` and its adjoint Fréchet backward."""

from __future__ import annotations

from .registry import extension_import_error, extension_kernel
from .tucker_split import tucker_ops

DEVICE_TYPES = ("cpu",)
_EPILOGUE = {"add": 0, "exact": 1, "taylor1": 2}


def unavailable_reason(device_type: str) -> str | None:
    return extension_import_error("_C")


def _forward(out, weight, U, R, d0, r0, n, scale, epilogue="add"):
    extension_kernel("_C", "lowrank_forward", out.dtype)(
        out.data_ptr(), 0 if weight is None else weight.data_ptr(), U.data_ptr(), R.data_ptr(),
        d0, r0, n, scale, _EPILOGUE[epilogue],
    )  # fmt: skip


def _backward(grad, weight, U, R, d_U, d_R, d0, r0, n, scale, epilogue="add"):
    extension_kernel("_C", "lowrank_backward", grad.dtype)(
        grad.data_ptr(), 0 if weight is None else weight.data_ptr(), U.data_ptr(), R.data_ptr(),
        d0, r0, n, scale, _EPILOGUE[epilogue], d_U.data_ptr(), d_R.data_ptr(),
    )  # fmt: skip


def _tucker_backward(grad, U0, R, d_U0, d_R, d0, r0, n, scale):
    _backward(grad, None, U0, R, d_U0, d_R, d0, r0, n, scale)


tucker_delta, tucker_merge, tucker_delta_backward = tucker_ops(_forward, _tucker_backward)


def lowrank_hadamard_merge(weight, B, A, scale, exp):
    out = weight.new_empty(weight.shape)
    _forward(out, weight, B, A, B.shape[0], B.shape[1], A.shape[1], scale, exp)
    return out


def lowrank_hadamard_merge_backward(grad, weight, B, A, scale, exp):
    d_B, d_A = B.new_empty(B.shape), A.new_empty(A.shape)
    _backward(grad, weight, B, A, d_B, d_A, B.shape[0], B.shape[1], A.shape[1], scale, exp)
    return [d_B, d_A]


def _matrices(A) -> tuple[int, int]:
    """(batch, n) of a (..., n, n) tensor (batch 0 when it is empty)."""
    n = A.shape[-1]
    return (A.numel() // (n * n) if n else 0), n


def matrix_exp(A):
    out = A.new_empty(A.shape)
    extension_kernel("_C", "matrix_exp", A.dtype)(out.data_ptr(), A.data_ptr(), *_matrices(A))
    return out


def matrix_exp_backward(grad, A):
    d_A = A.new_empty(A.shape)
    extension_kernel("_C", "matrix_exp_backward", A.dtype)(d_A.data_ptr(), grad.data_ptr(), A.data_ptr(), *_matrices(A))
    return d_A
