"""``matrix_exp``: batched matrix exponential of ``(..., n, n)``.

Backward is the adjoint Fréchet derivative, ∂L/∂A = L(Aᴴ, Γ), computed by the
backend's ``matrix_exp_backward`` (not by autograd through the forward). Non-finite
entries give non-finite results (NaN), never an error or a hang. An empty batch (or
n = 0) gives an empty result without running a backend."""

from __future__ import annotations

import torch
from torch import Tensor

from ..backends.registry import run
from ._common import check_tensor, custom_op, prepare, register_backward


@custom_op("matrix_exp", fake=lambda A: torch.empty_like(A))
def _matrix_exp(A: Tensor) -> Tensor:
    if A.numel() == 0:
        return torch.empty_like(A)
    return run("matrix_exp", A.device, A)


@custom_op("matrix_exp_backward", fake=lambda grad, A: torch.empty_like(A))
def _matrix_exp_backward(grad: Tensor, A: Tensor) -> Tensor:
    if A.numel() == 0:
        return torch.empty_like(A)
    return run("matrix_exp_backward", A.device, grad, A)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    (A,) = ctx.saved_tensors
    return _matrix_exp_backward(grad.contiguous(), A)


register_backward(_matrix_exp, "matrix_exp", _setup_context, _backward)


def matrix_exp(A: Tensor) -> Tensor:
    """exp(A) for each square matrix of ``A`` (shape ``(..., n, n)``), in A's dtype."""
    A = check_tensor(A, "A", min_ndim=2)
    if A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must hold square matrices (..., n, n), got shape {tuple(A.shape)}")
    (computed,) = prepare("matrix_exp", A)
    return _matrix_exp(computed).to(A.dtype)
