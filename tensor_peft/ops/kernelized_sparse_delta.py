"""``kernelized_sparse_delta``: ``sparsify(kernelized_delta(...))`` fused.

Memory is the point of SNELL: nothing of size m×n is saved for backward. The backward
recomputes ΔW_raw from the embeddings and kernel parameters, rebuilds the mask from the
saved threshold τ, and reduces straight into the parameter gradients.

``sparse_delta_and_threshold`` also returns τ, and takes a τ back to skip the selection:
a layer that rebuilds ΔW in backward (instead of keeping it) gets the same ΔW for the
cost of κ alone."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import check_choice, check_same_device, check_tensor, compute_dtype, prepare, run
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
    threshold: Tensor | None,
) -> tuple[Tensor, Tensor]:
    dropped = dropped_count(sparsity, out_emb.shape[1] * in_emb.shape[1])
    out, tau = run(
        "kernelized_sparse_delta", out_emb.device,
        out_emb, in_emb, dropped, kernel, coeff, params, eps, mode, threshold,
    )  # fmt: skip
    return out, tau if threshold is None else tau.clone()  # an output must not be an input


@_kernelized_sparse_delta.register_fake
def _(out_emb, in_emb, sparsity, kernel, coeff, params, eps, mode, threshold):
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
    out_emb, in_emb, sparsity, kernel, coeff, params, eps, mode, _ = inputs
    _, tau = output
    ctx.mark_non_differentiable(tau)
    ctx.save_for_backward(out_emb, in_emb, coeff, params, tau)
    ctx.kernel, ctx.eps, ctx.mode = kernel, eps, mode


def _backward(ctx, grad, grad_tau):
    out_emb, in_emb, coeff, params, tau = ctx.saved_tensors
    d_out, d_in, d_coeff, d_params = _kernelized_sparse_delta_backward(
        grad.contiguous(), out_emb, in_emb, tau, ctx.kernel, coeff, params, ctx.eps, ctx.mode
    )
    return d_out, d_in, None, None, d_coeff, d_params, None, None, None


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
    return sparse_delta_and_threshold(out_emb, in_emb, sparsity, kernel, mode, **kernel_params)[0]


def sparse_delta_and_threshold(
    out_emb: Tensor,
    in_emb: Tensor,
    sparsity: float,
    kernel: str = "piecewise_linear",
    mode: str = "hard",
    threshold: Tensor | None = None,
    **kernel_params,
) -> tuple[Tensor, Tensor]:
    """(``kernelized_sparse_delta(...)``, its threshold τ, a 0-dim tensor that stays on the
    device). Given ``threshold`` (the τ of an earlier call on the same inputs), ΔW is
    masked by it and nothing is selected: the same ΔW for the cost of κ alone."""
    out_emb, in_emb, kernel, coeff, params, eps = check_kernel_inputs(
        out_emb, in_emb, kernel, kernel_params
    )
    sparsity = check_sparsity(sparsity)
    mode = check_choice(mode, "mode", MODES)
    dtype = compute_dtype(out_emb, in_emb, coeff, params)
    if threshold is not None:
        threshold = check_tensor(threshold, "threshold", ndim=0)
        check_same_device({"out_emb": out_emb, "threshold": threshold})
        threshold = threshold.detach().to(dtype)
    out, tau = _kernelized_sparse_delta(
        prepare(out_emb, dtype), prepare(in_emb, dtype), sparsity, kernel,
        prepare(coeff, dtype), prepare(params, dtype), eps, mode, threshold,
    )  # fmt: skip
    return out.to(out_emb.dtype), tau
