"""``kernelized_sparse_delta``: ``sparsify(kernelized_delta(...))`` fused.

Memory is the point of SNELL: nothing of size m×n is saved for backward. The backward
recomputes ΔW_raw from the embeddings and kernel parameters, rebuilds the mask from the
saved threshold τ, and reduces straight into the parameter gradients.

``sparse_delta_and_threshold`` also returns τ, and takes a τ back to skip the selection:
a layer that rebuilds ΔW in backward (instead of keeping it) gets the same ΔW for the
cost of κ alone."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import MODES, THRESHOLDS, check_choice
from ..backends.kernelized_ops import effective_weight
from ._common import check_same_device, check_tensor, forward_backend, prepare, record_backend, run
from .kernelized_delta import check_kernel_inputs, fake_kernel_grads, is_empty, zero_kernel_grads
from .sparsify import select, sparsity_tensor


@torch.library.custom_op(
    "tensor_peft::kernelized_sparse_delta", mutates_args=(), device_types=("cpu", "cuda")
)
def _kernelized_sparse_delta(
    out_emb: Tensor,
    in_emb: Tensor,
    sparsity: Tensor,
    kernel: str,
    coeff: Tensor,
    params: Tensor,
    eps: float,
    mode: str,
    threshold: str,
    tau: Tensor | None,
) -> tuple[Tensor, Tensor]:
    out, new_tau = _sparse_delta(out_emb, in_emb, sparsity, kernel, coeff, params, eps, mode, threshold, tau)
    return out, new_tau if tau is None else new_tau.clone()  # an output must not be an input


def _sparse_delta(out_emb, in_emb, sparsity, kernel, coeff, params, eps, mode, threshold, tau) -> list[Tensor]:
    """[ΔW sparsified, τ] by the backend; an empty ΔW keeps all (τ = −inf, or the τ given).
    The backends take the dropped count k, read here on the host from ``sparsity``."""
    if is_empty(out_emb, in_emb):
        tau = params.new_full((), -math.inf) if tau is None else tau
        return [out_emb.new_empty(out_emb.shape[1], in_emb.shape[1]), tau]

    def compute(dropped: int, tau: Tensor | None) -> list[Tensor]:
        return run(
            "kernelized_sparse_delta", out_emb.device,
            out_emb, in_emb, dropped, kernel, coeff, params, eps, mode, tau,
        )  # fmt: skip

    if tau is not None:
        return compute(0, tau)
    return select(compute, sparsity, out_emb.shape[1] * in_emb.shape[1], threshold, params.dtype)


@_kernelized_sparse_delta.register_fake
def _(out_emb, in_emb, sparsity, kernel, coeff, params, eps, mode, threshold, tau):
    return out_emb.new_empty(out_emb.shape[1], in_emb.shape[1]), params.new_empty(())


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
    if is_empty(out_emb, in_emb):
        return zero_kernel_grads(out_emb, in_emb, coeff, params)
    return run(
        "kernelized_sparse_delta_backward", out_emb.device,
        grad, out_emb, in_emb, tau, kernel, coeff, params, eps, mode,
    )  # fmt: skip


@_kernelized_sparse_delta_backward.register_fake
def _(grad, out_emb, in_emb, tau, kernel, coeff, params, eps, mode):
    return fake_kernel_grads(out_emb, in_emb, coeff, params)


def _setup_context(ctx, inputs, output):
    out_emb, in_emb, sparsity, kernel, coeff, params, eps, mode, _, _ = inputs
    _, tau = output
    ctx.mark_non_differentiable(tau)
    ctx.save_for_backward(out_emb, in_emb, coeff, params, tau)
    ctx.kernel, ctx.eps, ctx.mode = kernel, eps, mode
    record_backend(ctx, "kernelized_sparse_delta", out_emb.device)


def _backward(ctx, grad, grad_tau):
    out_emb, in_emb, coeff, params, tau = ctx.saved_tensors
    with forward_backend(ctx):
        d_out, d_in, d_coeff, d_params = _kernelized_sparse_delta_backward(
            grad.contiguous(), out_emb, in_emb, tau, ctx.kernel, coeff, params, ctx.eps, ctx.mode
        )
    return d_out, d_in, None, None, d_coeff, d_params, None, None, None, None


_kernelized_sparse_delta.register_autograd(_backward, setup_context=_setup_context)


def kernelized_sparse_delta(
    out_emb: Tensor,
    in_emb: Tensor,
    sparsity: float | Tensor,
    kernel: str = "piecewise_linear",
    mode: str = "hard",
    threshold: str = "count",
    **kernel_params,
) -> Tensor:
    """``sparsify(kernelized_delta(out_emb, in_emb, kernel, **kernel_params), sparsity, mode,
    threshold)`` without keeping anything m×n for backward. Returns out_emb's dtype."""
    return sparse_delta_and_threshold(out_emb, in_emb, sparsity, kernel, mode, threshold=threshold, **kernel_params)[0]


def sparse_delta_and_threshold(
    out_emb: Tensor,
    in_emb: Tensor,
    sparsity: float | Tensor,
    kernel: str = "piecewise_linear",
    mode: str = "hard",
    tau: Tensor | None = None,
    threshold: str = "count",
    **kernel_params,
) -> tuple[Tensor, Tensor]:
    """(``kernelized_sparse_delta(...)``, its threshold τ, a 0-dim tensor that stays on the
    device). Given ``tau`` (the τ of an earlier call on the same inputs), ΔW is masked by
    it and nothing is selected: the same ΔW for the cost of κ alone."""
    (computed_out, computed_in, coeff, params), kernel, eps, sparsity, mode, threshold = _checked(
        out_emb, in_emb, sparsity, kernel, mode, threshold, kernel_params, "kernelized_sparse_delta"
    )
    if tau is not None:
        tau = check_tensor(tau, "tau", ndim=0)
        check_same_device({"out_emb": out_emb, "tau": tau})
        tau = tau.detach().to(params.dtype)
    out, tau = _kernelized_sparse_delta(
        computed_out, computed_in, sparsity, kernel, coeff, params, eps, mode, threshold, tau
    )  # fmt: skip
    return out.to(out_emb.dtype), tau


def _checked(out_emb, in_emb, sparsity, kernel, mode, threshold, kernel_params, op):
    """The arguments checked: ([out_emb, in_emb, coeff, params] as ``prepare(op, …)`` gives
    them (params, never half, in the compute dtype), kernel, eps, sparsity as a 0-dim
    float64 cpu tensor, mode, threshold)."""
    out_emb, in_emb, kernel, coeff, params, eps = check_kernel_inputs(out_emb, in_emb, kernel, kernel_params)
    sparsity = sparsity_tensor(sparsity)
    mode = check_choice(mode, "mode", MODES)
    threshold = check_choice(threshold, "threshold", THRESHOLDS)
    return prepare(op, out_emb, in_emb, coeff, params), kernel, eps, sparsity, mode, threshold


# --------------------------------------------------------------------------- in a linear layer


def _sparse_linear_forward(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    out_emb: Tensor,
    in_emb: Tensor,
    sparsity: Tensor,
    kernel: str,
    coeff: Tensor,
    stored_params: Tensor,
    softplus_count: int,
    eps: float,
    mode: str,
    threshold: str,
) -> tuple[Tensor, Tensor]:
    params = softplus_tail(stored_params, softplus_count)
    delta, tau = _sparse_delta(out_emb, in_emb, sparsity, kernel, coeff, params, eps, mode, threshold, None)
    return F.linear(input, effective_weight(delta, weight).to(input.dtype), bias), tau


_sparse_linear = torch.library.custom_op(
    "tensor_peft::sparse_linear", _sparse_linear_forward, mutates_args=(), device_types=("cpu", "cuda")
)


@_sparse_linear.register_fake
def _(input, weight, bias, out_emb, in_emb, sparsity, kernel, coeff, stored_params, softplus_count, eps, mode,
      threshold):  # fmt: skip
    return input.new_empty(*input.shape[:-1], out_emb.shape[1]), out_emb.new_empty(())


def _sparse_linear_gradients(
    grad: Tensor,
    input: Tensor,
    weight: Tensor | None,
    out_emb: Tensor,
    in_emb: Tensor,
    sparsity: Tensor,
    tau: Tensor,
    kernel: str,
    coeff: Tensor,
    params: Tensor,
    eps: float,
    mode: str,
    input_grad: bool,
    kernel_grads: bool,
) -> list[Tensor]:
    """[∂input, ∂out_emb, ∂in_emb, ∂coeff, ∂params] from the output's gradient ``grad``, in
    one op (one dispatch per backward): the kernel's gradients when ``kernel_grads``, and
    ∂input through W0 + ΔW (ΔW without a ``weight``) when ``input_grad``, by the backend
    on the way to the kernel's gradients (from ΔW rebuilt from τ when only ∂input is asked
    for). Empty tensors for the gradients not asked for."""
    if kernel_grads and not is_empty(out_emb, in_emb):

        def tokens(tensor: Tensor) -> Tensor:  # in the kernel's dtype
            return _tokens(tensor).to(out_emb.dtype).contiguous()

        grad_input, *gradients = run(
            "sparse_linear_backward", out_emb.device,
            tokens(grad), tokens(input), weight, out_emb, in_emb, float(sparsity), tau, kernel, coeff, params, eps,
            mode, _tokens(grad) if input_grad else None,
        )  # fmt: skip
        return [grad_input.reshape(input.shape) if input_grad else grad_input, *gradients]
    inputs = (out_emb, in_emb, coeff, params)
    gradients = zero_kernel_grads(*inputs) if kernel_grads else [t.new_empty(0) for t in inputs]
    if not input_grad:
        return [input.new_empty(0), *gradients]
    delta = _sparse_delta(out_emb, in_emb, sparsity, kernel, coeff, params, eps, mode, "count", tau)[0]
    return [grad @ effective_weight(delta, weight).to(grad.dtype), *gradients]


_sparse_linear_backward = torch.library.custom_op(
    "tensor_peft::sparse_linear_backward", _sparse_linear_gradients, mutates_args=(), device_types=("cpu", "cuda")
)


@_sparse_linear_backward.register_fake
def _(grad, input, weight, out_emb, in_emb, sparsity, tau, kernel, coeff, params, eps, mode, input_grad, kernel_grads):
    grad_input = input.new_empty(input.shape, dtype=grad.dtype) if input_grad else input.new_empty(0)
    if not kernel_grads:
        return [grad_input, *(t.new_empty(0) for t in (out_emb, in_emb, coeff, params))]
    return [grad_input, *fake_kernel_grads(out_emb, in_emb, coeff, params)]


def _tokens(tensor: Tensor) -> Tensor:
    """(tokens, features): the leading dimensions flattened (any of them may be 0)."""
    return tensor.reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1])


def softplus_tail(values: Tensor, count: int) -> Tensor:
    """``values`` (1-D) with its last ``count`` entries through softplus: an adapter stores
    a parameter that must be positive as softplus⁻¹ of its value."""
    if not count:
        return values
    plain, stored = torch.split_with_sizes(values, [values.shape[0] - count, count])
    return torch.cat([plain, F.softplus(stored)])


def _softplus_tail_backward(grad: Tensor, values: Tensor, count: int) -> Tensor:
    """∂L/∂values of ``softplus_tail(values, count)`` from ∂L/∂(its output)."""
    plain, tail = torch.split_with_sizes(grad, [grad.shape[0] - count, count])
    return torch.cat([plain, tail * torch.sigmoid(values[values.shape[0] - count :])])


def _sparse_linear_setup_context(ctx, inputs, output):
    """sparse_linear's autograd keeps the inputs and τ, nothing m×n. ``stored_params`` are
    the kernel's parameters with the last ``softplus_count`` of them as an adapter stores
    them (``softplus_tail``): the transform and its derivative run inside the op, not as
    autograd nodes of their own (a few per layer and step)."""
    input, weight, _, out_emb, in_emb, sparsity, kernel, coeff, stored_params, softplus_count, eps, mode, _ = inputs
    _, tau = output
    ctx.mark_non_differentiable(tau)
    ctx.save_for_backward(input, weight, out_emb, in_emb, coeff, stored_params, tau, sparsity)
    ctx.kernel, ctx.eps, ctx.mode, ctx.softplus_count = kernel, eps, mode, softplus_count
    record_backend(ctx, "kernelized_sparse_delta", out_emb.device)


def _sparse_linear_backward_formula(ctx, grad, grad_tau):
    saved = ctx.saved_tensors  # read once: activation checkpointing unpacks each tensor once
    input, weight, out_emb, in_emb, coeff, stored_params, tau, sparsity = saved
    params = softplus_tail(stored_params, ctx.softplus_count)
    input_grad, kernel_grads = ctx.needs_input_grad[0], any(ctx.needs_input_grad[3:])
    with forward_backend(ctx):
        grad_input, d_out, d_in, d_coeff, d_params = _sparse_linear_backward(
            grad, input, weight, out_emb, in_emb, sparsity, tau, ctx.kernel, coeff, params, ctx.eps, ctx.mode,
            input_grad, kernel_grads,
        )  # fmt: skip
    grad_bias = _tokens(grad).sum(0) if ctx.needs_input_grad[2] else None
    if not input_grad:
        grad_input = None
    if not kernel_grads:
        d_out = d_in = d_coeff = d_params = None
    elif ctx.softplus_count:
        d_params = _softplus_tail_backward(d_params, stored_params, ctx.softplus_count)
    return grad_input, None, grad_bias, d_out, d_in, None, None, d_coeff, d_params, None, None, None, None


_sparse_linear.register_autograd(_sparse_linear_backward_formula, setup_context=_sparse_linear_setup_context)


def sparse_linear(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    out_emb: Tensor,
    in_emb: Tensor,
    sparsity: float | Tensor,
    kernel: str = "piecewise_linear",
    mode: str = "hard",
    threshold: str = "count",
    **kernel_params,
) -> Tensor:
    """``F.linear(input, weight + kernelized_sparse_delta(out_emb, in_emb, ...), bias)`` for a
    frozen ``weight`` (m, n), or ``F.linear(input, kernelized_sparse_delta(...), bias)`` for
    ``weight=None`` (the update's own output, over a base that computes W0·x itself, e.g. a
    quantized one), keeping neither W0 + ΔW nor anything m×n for backward: ΔW is rebuilt
    from τ for ∂L/∂input. The cpu backend's backward works in column blocks of the weight
    (Γ = ∂L/∂ΔW, ΔW and W0 + ΔW a block at a time: nothing m×n exists there), and computes
    Γ only where the mask keeps an entry when few are kept."""
    (out_emb, in_emb, coeff, params), kernel, eps, sparsity, mode, threshold = _checked(
        out_emb, in_emb, sparsity, kernel, mode, threshold, kernel_params, None
    )  # in the compute dtype: W0 + ΔW is summed there, from a ΔW not rounded to a half dtype
    input = check_tensor(input, "input", min_ndim=1)
    shape = (out_emb.shape[1], in_emb.shape[1])
    if weight is not None:
        weight = check_tensor(weight, "weight", ndim=2)
        if weight.requires_grad:
            raise ValueError("weight requires grad: sparse_linear trains only the adapter (freeze the base weight)")
        if tuple(weight.shape) != shape:
            raise ValueError(
                f"weight must have the shape {shape} of the embeddings' rows and columns, got {tuple(weight.shape)}"
            )
    if input.shape[-1] != shape[1]:
        raise ValueError(f"input's last dimension must be {shape[1]} (in_emb's rows), got input {tuple(input.shape)}")
    if bias is not None:
        bias = check_tensor(bias, "bias", ndim=1)
        if bias.shape[0] != shape[0]:
            raise ValueError(f"bias must have shape ({shape[0]},) (the weight's rows), got {tuple(bias.shape)}")
    optional = {name: tensor for name, tensor in (("weight", weight), ("bias", bias)) if tensor is not None}
    check_same_device({"input": input, "out_emb": out_emb, **optional})
    return prepared_sparse_linear(input, weight, bias, out_emb, in_emb, sparsity, kernel, coeff, params, eps, mode, threshold)


def prepared_sparse_linear(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    out_emb: Tensor,
    in_emb: Tensor,
    sparsity: Tensor,
    kernel: str,
    coeff: Tensor,
    params: Tensor,
    eps: float,
    mode: str,
    threshold: str,
    softplus_count: int = 0,
) -> Tensor:
    """``sparse_linear`` on arguments already in the form its checks give them, not checked
    again: the embeddings, ``coeff`` ``(H,)`` and ``params`` (alpha, beta, gamma) contiguous
    in one float32/float64 dtype on input's device, ``sparsity`` a 0-dim float64 cpu tensor,
    valid choices, a frozen ``weight`` of the embeddings' shape or None; the last ``softplus_count``
    of ``params`` in an adapter's stored form (``softplus_tail``). For a caller that builds
    them so on every forward (the SNELL layer), where the checks cost as much as a small
    layer's kernels."""
    return _sparse_linear(
        input, weight, bias, out_emb, in_emb, sparsity, kernel, coeff, params, softplus_count, eps, mode, threshold
    )[0]  # fmt: skip
