"""What the native backends share for SNELL's kernelized ops: the numbers their kernels
take for a kernel function and a sparsification mode, the four op functions made from a
backend's two launchers (``kernelized_ops``), and the linear layer's backward by a dense
Γ (``dense_linear_backward``)."""

from __future__ import annotations

from typing import Callable

from .reference import KERNELS, MODES


def kernel_id(kernel: str) -> int:
    """The number the native kernels take for ``kernel``: its place in ``KERNELS``."""
    return KERNELS.index(kernel)


def mode_id(mode: str | None) -> int:
    """The number the native kernels take for ``mode``: 0 none, 1 hard, 2 soft."""
    return 0 if mode is None else MODES.index(mode) + 1


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
