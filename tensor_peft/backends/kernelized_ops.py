"""What the backends' SNELL ops share: the numbers their kernels take for a kernel function
and a sparsification mode, and ``sparse_linear_backward`` built from a backend's own two ops."""

from __future__ import annotations

from types import ModuleType

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


def sparse_linear_backward_from_dense(forward, backward, grad_out, input, out_emb, in_emb, sparsity, tau, kernel, coeff,
                                      params, eps, mode, with_delta) -> list[Tensor]:  # fmt: skip
    """The op ``sparse_linear_backward`` of a backend whose ``kernelized_sparse_delta`` is
    ``forward`` and whose backward of it is ``backward``: Γ = grad_outᵀ·input formed whole by a
    matrix product (on a GPU it runs on the tensor cores, faster than gathering the kept
    entries), and the sparsified ΔW, when ``with_delta``, by the forward with the saved τ."""
    gradients = backward(grad_out.t() @ input, out_emb, in_emb, tau, kernel, coeff, params, eps, mode)
    delta = forward(out_emb, in_emb, 0, kernel, coeff, params, eps, mode, tau)[0] if with_delta else None
    return [*gradients, delta]
