"""``lowrank_hadamard_merge``: the LieRA (Hadamard group) merge W0 ⊙ exp(s·B·A).

``exp="exact"``: W_eff = W0 ⊙ exp(ΔW); ``exp="taylor1"`` (the authors' released form):
W_eff = W0 ⊙ (1 + ΔW). With ΔW = s·B·A on the matrix view of W0. Backward:
∂L/∂ΔW = Γ ⊙ W_eff (exact) or Γ ⊙ W0 (taylor1), then ∂L/∂B = s·∂L/∂ΔW·Aᵀ and
∂L/∂A = s·Bᵀ·∂L/∂ΔW; W_eff is recomputed, nothing of W0's size is saved. W0 is
frozen and gets no gradient; its zero entries never move. The exponential is taken
in at least float32; a result too large for W0's dtype becomes inf (adapters refuse
to merge non-finite weights)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import EXP_FORMS, check_choice, check_real
from ._common import check_frozen, check_same_device, check_tensor, forward_backend, prepare, record_backend, run


def _vanishes(weight: Tensor, B: Tensor) -> bool:
    """W0 has no entries, or the rank is 0 (ΔW = 0: the merge is W0, the gradients zero)."""
    return weight.numel() == 0 or B.shape[1] == 0


@torch.library.custom_op(
    "tensor_peft::lowrank_hadamard_merge", mutates_args=(), device_types=("cpu", "cuda")
)
def _lowrank_hadamard_merge(weight: Tensor, B: Tensor, A: Tensor, scale: float, exp: str) -> Tensor:
    if _vanishes(weight, B):
        return weight.clone()
    return run("lowrank_hadamard_merge", weight.device, weight, B, A, scale, exp)


@_lowrank_hadamard_merge.register_fake
def _(weight, B, A, scale, exp):
    return torch.empty_like(weight)


@torch.library.custom_op(
    "tensor_peft::lowrank_hadamard_merge_backward", mutates_args=(), device_types=("cpu", "cuda")
)
def _lowrank_hadamard_merge_backward(
    grad: Tensor, weight: Tensor, B: Tensor, A: Tensor, scale: float, exp: str
) -> list[Tensor]:
    if _vanishes(weight, B):
        return [torch.zeros_like(B), torch.zeros_like(A)]
    return run("lowrank_hadamard_merge_backward", weight.device, grad, weight, B, A, scale, exp)


@_lowrank_hadamard_merge_backward.register_fake
def _(grad, weight, B, A, scale, exp):
    return [torch.empty_like(B), torch.empty_like(A)]


def _setup_context(ctx, inputs, output):
    weight, B, A, scale, exp = inputs
    ctx.save_for_backward(weight, B, A)
    ctx.scale, ctx.exp = scale, exp
    record_backend(ctx, "lowrank_hadamard_merge", weight.device)


def _backward(ctx, grad):
    weight, B, A = ctx.saved_tensors
    with forward_backend(ctx):
        d_B, d_A = _lowrank_hadamard_merge_backward(grad.contiguous(), weight, B, A, ctx.scale, ctx.exp)
    return None, d_B, d_A, None, None


_lowrank_hadamard_merge.register_autograd(_backward, setup_context=_setup_context)


def lowrank_hadamard_merge(
    weight: Tensor, B: Tensor, A: Tensor, scale: float, exp: str = "exact"
) -> Tensor:
    """W0 ⊙ exp(scale · B · A) (or W0 ⊙ (1 + scale · B · A) for ``exp="taylor1"``), fused.

    weight: ``(m, ...)`` (Linear or ConvNd layout); B: ``(m, r)``; A: ``(r, n)`` with
    ``n = prod(weight.shape[1:])``, or ``(r, *weight.shape[1:])`` (conv A keeps its
    spatial structure). Returns weight's shape and dtype; weight gets no gradient."""
    weight = check_tensor(weight, "weight", min_ndim=2)
    B = check_tensor(B, "B", ndim=2)
    A = check_tensor(A, "A", min_ndim=2)
    scale = check_real(scale, "scale")
    exp = check_choice(exp, "exp", EXP_FORMS)
    rows, cols = weight.shape[0], math.prod(weight.shape[1:])
    rank = B.shape[1]
    if B.shape[0] != rows:
        raise ValueError(f"B must have shape ({rows}, r) for weight {tuple(weight.shape)}, got {tuple(B.shape)}")
    if tuple(A.shape) not in ((rank, cols), (rank, *weight.shape[1:])):
        raise ValueError(
            f"A must have shape ({rank}, {cols}) or ({rank}, *weight.shape[1:]) for B of rank "
            f"{rank} and weight {tuple(weight.shape)}, got {tuple(A.shape)}"
        )
    check_same_device({"weight": weight, "B": B, "A": A})
    check_frozen(weight)
    computed_weight, B, A = prepare("lowrank_hadamard_merge", weight, B, A.reshape(rank, cols))
    return _lowrank_hadamard_merge(computed_weight, B, A, scale, exp).to(weight.dtype)


# --------------------------------------------------------------------------- in a linear layer


def _tokens(tensor: Tensor) -> Tensor:
    """(tokens, features): the leading dimensions flattened."""
    return tensor.reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1])


class _HadamardLinear(torch.autograd.Function):
    """``F.linear(input, W0 ⊙ exp(s·B·A), bias)`` keeping nothing of W0's size for backward.

    Backward forms Γ = grad_outᵀ·input itself, contiguous and in the merge's dtype (autograd's
    Γ of a linear's weight is the transpose of a product: the merge's backward would copy it),
    reduces it into ∂B, ∂A, frees it, and only then rebuilds W_eff for ∂input: one m×n
    tensor alive at a time."""

    @staticmethod
    def forward(ctx, input, weight, bias, B, A, scale, exp):
        merged = _lowrank_hadamard_merge(weight, B, A, scale, exp).to(input.dtype)
        ctx.save_for_backward(input, weight, B, A)
        ctx.scale, ctx.exp = scale, exp
        if torch.compiler.is_compiling():
            ctx.backend = None
        else:
            record_backend(ctx, "lowrank_hadamard_merge", weight.device)
        return F.linear(input, merged, bias)

    @staticmethod
    def backward(ctx, grad):
        input, weight, B, A = ctx.saved_tensors
        grad_input = grad_bias = d_B = d_A = None
        with forward_backend(ctx):
            if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
                product_dtype = torch.promote_types(grad.dtype, input.dtype)  # they differ under autocast
                gamma = (_tokens(grad).T.to(product_dtype) @ _tokens(input).to(product_dtype)).to(weight.dtype)
                d_B, d_A = _lowrank_hadamard_merge_backward(gamma, weight, B, A, ctx.scale, ctx.exp)
                del gamma
            if ctx.needs_input_grad[0]:
                merged = _lowrank_hadamard_merge(weight, B, A, ctx.scale, ctx.exp).to(input.dtype)
                grad_input = grad @ merged.to(grad.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = _tokens(grad).sum(0)
        return grad_input, None, grad_bias, d_B, d_A, None, None


def hadamard_linear(
    input: Tensor, weight: Tensor, bias: Tensor | None, B: Tensor, A: Tensor, scale: float, exp: str = "exact"
) -> Tensor:
    """``F.linear(input, W0 ⊙ exp(s·B·A), bias)`` for a frozen ``weight`` W0 (m, n), B (m, r),
    A (r, n), the merged weight computed as ``lowrank_hadamard_merge`` computes it and rounded
    once to ``input``'s dtype; no m×n tensor kept for backward, Γ formed once, contiguous, in
    backward."""
    input = check_tensor(input, "input", min_ndim=1)
    weight = check_tensor(weight, "weight", ndim=2)
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input's last dimension must be weight's {weight.shape[1]} columns, got {tuple(input.shape)}")
    if bias is not None and tuple(check_tensor(bias, "bias").shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) (the weight's rows), got {tuple(bias.shape)}")
    B = check_tensor(B, "B", ndim=2)
    A = check_tensor(A, "A", ndim=2)
    scale = check_real(scale, "scale")
    exp = check_choice(exp, "exp", EXP_FORMS)
    if B.shape[0] != weight.shape[0] or tuple(A.shape) != (B.shape[1], weight.shape[1]):
        raise ValueError(
            f"B (m, r) and A (r, n) must match weight {tuple(weight.shape)}, got {tuple(B.shape)} and {tuple(A.shape)}"
        )
    check_same_device({"input": input, "weight": weight, "B": B, "A": A})
    check_frozen(weight)
    computed_weight, B, A = prepare("lowrank_hadamard_merge", weight, B, A)
    return _HadamardLinear.apply(input, computed_weight, bias, B, A, scale, exp)
