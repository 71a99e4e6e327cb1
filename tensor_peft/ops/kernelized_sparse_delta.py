"""``kernelized_sparse_delta``: ``sparsify(kernelized_delta(...))`` fused.

Memory is the point of SNELL: nothing of size m×n is saved for backward. The backward
recomputes ΔW_raw from the embeddings and kernel parameters, rebuilds the mask from the
saved threshold τ, and reduces straight into the parameter gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_choice, compute_dtype, prepare, run
from .kernelized_delta import check_kernel_inputs, fake_kernel_grads
from .sparsify import MODES, check_sparsity, dropped_count


@torch.library.custom_op(
    "tensor_peft::kernelized_sparse_delta", mutates_args=(), device_types=("cpu", "cuda")
)
def _kernelized_sparse_delta(
    out_emb: Tensor,
    in_emb: Tensor,
    sparsity: float,
    kernel: str,
    coeff: Tensor,
    params: Tensor,
    eps: float,
    mode: str,
) -> tuple[Tensor, Tensor]:
    dropped = dropped_count(sparsity, out_emb.shape[1] * in_emb.shape[1])
    out, tau = run(
        "kernelized_sparse_delta", out_emb.device,
        out_emb, in_emb, dropped, kernel, coeff, params, eps, mode,
    )  # fmt: skip
    return out, tau


@_kernelized_sparse_delta.register_fake
def _(out_emb, in_emb, sparsity, kernel, coeff, params, eps, mode):
    return out_emb.new_empty(out_emb.shape[1], in_emb.shape[1]), out_emb.new_empty(())


@torch.library.custom_op(
    "tensor_peft::kernelized_sparse_delta_backward", mutates_args=(), device_types=("cpu", "cuda")
)
def _kernelized_sparse_delta_backward(
    grad: Tensor,
    out_emb: Tensor,
    in_emb: Tensor,
    tau: Tensor,
    kernel: str,
    coeff: Tensor,
    params: Tensor,
    eps: float,
    mode: str,
) -> list[Tensor]:
    return run(
        "kernelized_sparse_delta_backward", out_emb.device,
        grad, out_emb, in_emb, tau, kernel, coeff, params, eps, mode,
    )  # fmt: skip


@_kernelized_sparse_delta_backward.register_fake
def _(grad, out_emb, in_emb, tau, kernel, coeff, params, eps, mode):
    return fake_kernel_grads(out_emb, in_emb, coeff, params)


def _setup_context(ctx, inputs, output):
    out_emb, in_emb, sparsity, kernel, coeff, params, eps, mode = inputs
    _, tau = output
    ctx.mark_non_differentiable(tau)
    ctx.save_for_backward(out_emb, in_emb, coeff, params, tau)
    ctx.kernel, ctx.eps, ctx.mode = kernel, eps, mode


def _backward(ctx, grad, grad_tau):
    out_emb, in_emb, coeff, params, tau = ctx.saved_tensors
    d_out, d_in, d_coeff, d_params = _kernelized_sparse_delta_backward(
        grad.contiguous(), out_emb, in_emb, tau, ctx.kernel, coeff, params, ctx.eps, ctx.mode
    )
    return d_out, d_in, None, None, d_coeff, d_params, None, None


_kernelized_sparse_delta.register_autograd(_backward, setup_context=_setup_context)


def kernelized_sparse_delta(
    out_emb: Tensor,
    in_emb: Tensor,
    sparsity: float,
    kernel: str = "piecewise_linear",
    mode: str = "hard",
    **kernel_params,
) -> Tensor:
    """``sparsify(kernelized_delta(out_emb, in_emb, kernel, **kernel_params), sparsity, mode)``
    without keeping anything m×n for backward. Returns out_emb's dtype."""
    out_emb, in_emb, kernel, coeff, params, eps = check_kernel_inputs(
        out_emb, in_emb, kernel, kernel_params
    )
    sparsity = check_sparsity(sparsity)
    mode = check_choice(mode, "mode", MODES)
    dtype = compute_dtype(out_emb, in_emb, coeff, params)
    out, _ = _kernelized_sparse_delta(
        prepare(out_emb, dtype), prepare(in_emb, dtype), sparsity, kernel,
        prepare(coeff, dtype), prepare(params, dtype), eps, mode,
    )  # fmt: skip
    return out.to(out_emb.dtype)
