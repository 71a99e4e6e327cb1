"""``matrix_exp``: batched matrix exponential of ``(..., n, n)``.

Backward is the adjoint Fréchet derivative, ∂L/∂A = L(Aᴴ, Γ), computed by the
backend's ``matrix_exp_backward`` (not by autograd through the forward). Non-finite
entries give non-finite results (NaN), never an error or a hang. An empty batch (or
n = 0) gives an empty result without running a backend."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_tensor, forward_backend, prepare, record_backend, run


@torch.library.custom_op("tensor_peft::matrix_exp", mutates_args=(), device_types=("cpu", "cuda"))
def _matrix_exp(A: Tensor) -> Tensor:
    if A.numel() == 0:
        return torch.empty_like(A)
    return run("matrix_exp", A.device, A)


@_matrix_exp.register_fake
def _(A):
    return torch.empty_like(A)


@torch.library.custom_op(
    "tensor_peft::matrix_exp_backward", mutates_args=(), device_types=("cpu", "cuda")
)
def _matrix_exp_backward(grad: Tensor, A: Tensor) -> Tensor:
    if A.numel() == 0:
        return torch.empty_like(A)
    return run("matrix_exp_backward", A.device, grad, A)


@_matrix_exp_backward.register_fake
def _(grad, A):
    return torch.empty_like(A)


def _setup_context(ctx, inputs, output):
    (A,) = inputs
    ctx.save_for_backward(A)
    record_backend(ctx, "matrix_exp", A.device)


def _backward(ctx, grad):
    (A,) = ctx.saved_tensors
    with forward_backend(ctx):
        return _matrix_exp_backward(grad.contiguous(), A)


_matrix_exp.register_autograd(_backward, setup_context=_setup_context)


def matrix_exp(A: Tensor) -> Tensor:
    """exp(A) for each square matrix of ``A`` (shape ``(..., n, n)``), in A's dtype."""
    A = check_tensor(A, "A", min_ndim=2)
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must hold square matrices (..., n, n), got shape {tuple(A.shape)}")
    (computed,) = prepare("matrix_exp", A)
    return _matrix_exp(computed).to(A.dtype)
