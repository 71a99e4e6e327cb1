"""What the native backends share for SNELL's kernelized ops: the numbers their kernels
take for a kernel function and a sparsification mode, the four op functions made from a
backend's two launchers (``kernelized_ops``), and the linear layer's backward by a dense
Γ (``dense_linear_backward``)."""

from __future__ import annotations

from types import ModuleType
from typing import Callable

from .reference import KERNELS, MODES


def kernel_id(kernel: str, extension: ModuleType | None = None) -> int:
    """The number the kernels take for ``kernel``: from the compiled ``extension``'s
    ``KERNEL_IDS`` (``_C``, ``_cuda``: csrc/include/tensor_peft/kernelized.h defines them),
    else (the triton backend, which runs without one) its place in ``KERNELS``; a test
    asserts that the two agree."""
    return KERNELS.index(kernel) if extension is None else extension.KERNEL_IDS[kernel]


def mode_id(mode: str | None, extension: ModuleType | None = None) -> int:
    """The number the kernels take for the sparsification ``mode`` (None: none), from the
    ``extension``'s ``MODE_IDS`` as ``kernel_id``, else 0 none, 1 hard, 2 soft."""
    name = "none" if mode is None else mode
    return ("none", *MODES).index(name) if extension is None else extension.MODE_IDS[name]


def kernelized_ops(compute: Callable, gradients: Callable) -> tuple[Callable, Callable, Callable, Callable]:
    """(kernelized_delta, its backward, kernelized_sparse_delta, its backward) from
    ``compute(out_emb, in_emb, kernel, coeff, params, eps, k=0, mode=None, tau=None)`` →
    (ΔW, τ), sparsified when ``mode`` is given with ``tau``, or else the k-th smallest
    magnitude τ, and
    ``gradients(grad, out_emb, in_emb, kernel, coeff, params, eps, tau=None, mode=None)`` →
    [∂out_emb, ∂in_emb, ∂coeff, ∂params]."""

    def kernelized_delta(out_emb, in_emb, kernel, coeff, params, eps):
        return compute(out_emb, in_emb, kernel, coeff, params, eps)[0]

    def kernelized_delta_backward(grad, out_emb, in_emb, kernel, coeff, params, eps):
        return gradients(grad, out_emb, in_emb, kernel, coeff, params, eps)

    def kernelized_sparse_delta(out_emb, in_emb, k, kernel, coeff, params, eps, mode, tau=None):
        return list(compute(out_emb, in_emb, kernel, coeff, params, eps, k, mode, tau))

    def kernelized_sparse_delta_backward(grad, out_emb, in_emb, tau, kernel, coeff, params, eps, mode):
        return gradients(grad, out_emb, in_emb, kernel, coeff, params, eps, tau, mode)

    return kernelized_delta, kernelized_delta_backward, kernelized_sparse_delta, kernelized_sparse_delta_backward


def dense_linear_backward(sparse_delta_backward: Callable) -> Callable:
    """``kernelized_sparse_linear_backward`` from a backend's ``kernelized_sparse_delta_backward``
    with Γ = grad_outᵀ·input formed whole by a matrix product: on a GPU the product runs on
    the tensor cores, faster than gathering the kept entries."""

    def kernelized_sparse_linear_backward(grad_out, input, out_emb, in_emb, sparsity, tau, kernel, coeff, params, eps, mode):
        return sparse_delta_backward(grad_out.t() @ input, out_emb, in_emb, tau, kernel, coeff, params, eps, mode)

    return kernelized_sparse_linear_backward
