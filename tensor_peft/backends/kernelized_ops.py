"""What the backends' SNELL ops share: the numbers their kernels take for a kernel function
and a sparsification mode, W0 + ΔW, and ``sparse_linear_backward`` built from a backend's own two ops."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ..config import KERNELS, MODES


def kernel_id(kernel: str, extension: ModuleType | None = None) -> int:
    """The number the kernels take for the kernel function ``kernel``: from the compiled
    ``extension``'s ``KERNEL_IDS`` (``_C``, ``_cuda``: csrc/include/tensor_peft/kernelized.h
    defines them), else (the triton backend, which runs without one) its place in
    ``KERNELS``; a test asserts that the two agree."""
    return KERNELS.index(kernel) if extension is None else extension.KERNEL_IDS[kernel]


def mode_id(mode: str | None, extension: ModuleType | None = None) -> int:
    """The number the kernels take for the sparsification ``mode`` (None: none), from the
    ``extension``'s ``MODE_IDS`` as ``kernel_id``, else 0 none, 1 hard, 2 soft."""
    name = "none" if mode is None else mode
    return ("none", *MODES).index(name) if extension is None else extension.MODE_IDS[name]


def effective_weight(delta: Tensor, weight: Tensor | None) -> Tensor:
    """W0 + ΔW (ΔW alone without a ``weight``), summed into ΔW's fresh buffer where its dtype
    holds the sum (a new m×n tensor is a pass of the system's page zeroing more), else in
    the wider dtype."""
    if weight is None:
        return delta
    if torch.promote_types(delta.dtype, weight.dtype) == delta.dtype:
        return delta.add_(weight)
    return weight + delta


def sparse_linear_backward_from_dense(forward, backward, grad_out, input, weight, out_emb, in_emb, sparsity, tau, kernel,
                                      coeff, params, eps, mode, grad_for_input) -> list[Tensor]:  # fmt: skip
    """The op ``sparse_linear_backward`` of a backend whose ``kernelized_sparse_delta`` is
    ``forward`` and whose backward of it is ``backward``: Γ = grad_outᵀ·input formed whole by a
    matrix product (on a GPU it runs on the tensor cores, faster than gathering the kept
    entries), and, given ``grad_for_input`` (grad_out in the dtype ∂input takes), ∂input =
    grad_for_input·(W0 + ΔW) with the sparsified ΔW made by the forward with the saved τ
    (an empty tensor otherwise)."""
    gradients = backward(grad_out.t() @ input, out_emb, in_emb, tau, kernel, coeff, params, eps, mode)
    if grad_for_input is None:
        return [input.new_empty(0), *gradients]
    delta = forward(out_emb, in_emb, 0, kernel, coeff, params, eps, mode, tau)[0]
    return [grad_for_input @ effective_weight(delta, weight).to(grad_for_input.dtype), *gradients]
