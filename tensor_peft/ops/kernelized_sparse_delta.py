"""``kernelized_sparse_delta``: ``sparsify(kernelized_delta(...))`` fused.

Memory is the point of SNELL: nothing of size m×n is saved for backward. The backward
recomputes ΔW_raw from the embeddings and kernel parameters, rebuilds the mask from the
saved threshold τ, and reduces straight into the parameter gradients.

``sparse_delta_and_threshold`` also returns τ, and takes a τ back to skip the selection:
a layer that rebuilds ΔW in backward (instead of keeping it) gets the same ΔW for the
cost of κ alone."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends.kernelized_ops import (
    PROBLEM_SCHEMA, KernelProblem, effective_weight, flat_problem, problem_gradients, rebuilt_problem, with_problem,
)  # fmt: skip
from ..backends.registry import run
from ..config import MODES, THRESHOLDS, check_choice
from ._common import check_same_device, check_tensor, custom_op, register_backward
from .kernelized_delta import (
    check_kernel_inputs, fake_kernel_grads, kernel_gradients, prepared_problem, save_problem, saved_problem,
)  # fmt: skip
from .sparsify import select, sparsity_tensor

_PROBLEM_FIELDS = len(KernelProblem._fields)  # sparse_linear's own arguments follow the problem's


def _sparse_delta(problem: KernelProblem, sparsity: Tensor, threshold: str, tau: Tensor | None) -> list[Tensor]:
    """[ΔW sparsified, τ] by the backend; an empty ΔW keeps all (τ = −inf, or the τ given).
    The backends take the dropped count k, read here on the host from ``sparsity``."""
    if problem.is_empty:
        tau = problem.params.new_full((), -math.inf) if tau is None else tau
        return [problem.out_emb.new_empty(problem.shape), tau]

    compute = functools.partial(run, "kernelized_sparse_delta", problem.out_emb.device, problem)  # (k, τ)
    if tau is not None:
        return compute(0, tau)
    return select(compute, sparsity, math.prod(problem.shape), threshold, problem.params.dtype)


@with_problem
def _fake_sparse_delta(problem, sparsity, threshold, tau):
    return problem.out_emb.new_empty(problem.shape), problem.params.new_empty(())


@custom_op(
    "kernelized_sparse_delta", fake=_fake_sparse_delta,
    schema=f"({PROBLEM_SCHEMA}, Tensor sparsity, str threshold, Tensor? tau) -> (Tensor, Tensor)",
)  # fmt: skip
@with_problem
def _kernelized_sparse_delta(problem, sparsity, threshold, tau) -> tuple[Tensor, Tensor]:
    out, new_tau = _sparse_delta(problem, sparsity, threshold, tau)
    return out, new_tau if tau is None else new_tau.clone()  # an output must not be an input


def _setup_context(ctx, inputs, output):
    _, tau = output
    ctx.mark_non_differentiable(tau)
    save_problem(ctx, rebuilt_problem(inputs)[0], tau)


def _backward(ctx, grad, grad_tau):
    problem, (tau,) = saved_problem(ctx)
    gradients = kernel_gradients(*flat_problem(problem, grad.contiguous(), tau))
    return *problem_gradients(*gradients), None, None, None


register_backward(_kernelized_sparse_delta, "kernelized_sparse_delta", _setup_context, _backward)


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
    problem, sparsity, threshold = _checked(
        out_emb, in_emb, sparsity, kernel, mode, threshold, kernel_params, "kernelized_sparse_delta"
    )
    if tau is not None:
        tau = check_tensor(tau, "tau", ndim=0)
        check_same_device({"out_emb": out_emb, "tau": tau})
        tau = tau.detach().to(problem.params.dtype)
    out, tau = _kernelized_sparse_delta(*flat_problem(problem, sparsity, threshold, tau))
    return out.to(out_emb.dtype), tau


def _checked(out_emb, in_emb, sparsity, kernel, mode, threshold, kernel_params, op):
    """The arguments checked: (the problem with ``mode``, its tensors as ``prepared_problem(op,
    …)`` gives them, sparsity as a 0-dim float64 cpu tensor, threshold)."""
    problem = check_kernel_inputs(out_emb, in_emb, kernel, kernel_params)
    problem = problem._replace(mode=check_choice(mode, "mode", MODES))
    threshold = check_choice(threshold, "threshold", THRESHOLDS)
    return prepared_problem(op, problem), sparsity_tensor(sparsity), threshold


# --------------------------------------------------------------------------- in a linear layer


@with_problem
def _fake_sparse_linear(problem, input, weight, bias, sparsity, threshold, softplus_count):
    return input.new_empty(*input.shape[:-1], problem.shape[0]), problem.out_emb.new_empty(())


@custom_op(
    "sparse_linear", fake=_fake_sparse_linear,
    schema=f"({PROBLEM_SCHEMA}, Tensor input, Tensor? weight, Tensor? bias, Tensor sparsity, str threshold, "
    "int softplus_count) -> (Tensor, Tensor)",
)  # fmt: skip
@with_problem
def _sparse_linear(
    problem: KernelProblem, input: Tensor, weight: Tensor | None, bias: Tensor | None, sparsity: Tensor, threshold: str,
    softplus_count: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    problem = problem._replace(params=softplus_tail(problem.params, softplus_count))
    delta, tau = _sparse_delta(problem, sparsity, threshold, None)
    return F.linear(input, effective_weight(delta, weight).to(input.dtype), bias), tau


@with_problem
def _fake_sparse_linear_backward(problem, grad, input, weight, sparsity, tau, input_grad, kernel_grads):
    grad_input = input.new_empty(input.shape, dtype=grad.dtype) if input_grad else input.new_empty(0)
    if not kernel_grads:
        return [grad_input, *(t.new_empty(0) for t in problem.differentiable())]
    return [grad_input, *fake_kernel_grads(problem)]


@custom_op(
    "sparse_linear_backward", fake=_fake_sparse_linear_backward,
    schema=f"({PROBLEM_SCHEMA}, Tensor grad, Tensor input, Tensor? weight, Tensor sparsity, Tensor tau, "
    "bool input_grad, bool kernel_grads) -> Tensor[]",
)  # fmt: skip
@with_problem
def _sparse_linear_backward(
    problem: KernelProblem, grad: Tensor, input: Tensor, weight: Tensor | None, sparsity: Tensor, tau: Tensor,
    input_grad: bool, kernel_grads: bool,
) -> list[Tensor]:  # fmt: skip
    """[∂input, ∂out_emb, ∂in_emb, ∂coeff, ∂params] from the output's gradient ``grad``, in
    one op (one dispatch per backward): the kernel's gradients when ``kernel_grads``, and
    ∂input through W0 + ΔW (ΔW without a ``weight``) when ``input_grad``, by the backend
    on the way to the kernel's gradients (from ΔW rebuilt from τ when only ∂input is asked
    for). Empty tensors for the gradients not asked for."""
    if kernel_grads and not problem.is_empty:

        def tokens(tensor: Tensor) -> Tensor:  # in the kernel's dtype
            return _tokens(tensor).to(problem.out_emb.dtype).contiguous()

        grad_input, *gradients = run(
            "sparse_linear_backward", problem.out_emb.device,
            tokens(grad), tokens(input), weight, problem, float(sparsity), tau, _tokens(grad) if input_grad else None,
        )  # fmt: skip
        return [grad_input.reshape(input.shape) if input_grad else grad_input, *gradients]
    inputs = problem.differentiable()
    gradients = [torch.zeros_like(t) if kernel_grads else t.new_empty(0) for t in inputs]  # ΔW empty: zero
    if not input_grad:
        return [input.new_empty(0), *gradients]
    delta = _sparse_delta(problem, sparsity, "count", tau)[0]
    return [grad @ effective_weight(delta, weight).to(grad.dtype), *gradients]


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
    """sparse_linear's autograd keeps the inputs and τ, nothing m×n. The problem's ``params``
    are the kernel's parameters with the last ``softplus_count`` of them as an adapter stores
    them (``softplus_tail``): the transform and its derivative run inside the op, not as
    autograd nodes of their own (a few per layer and step)."""
    problem, (input, weight, _, sparsity, _, softplus_count) = rebuilt_problem(inputs)
    _, tau = output
    ctx.mark_non_differentiable(tau)
    save_problem(ctx, problem, input, weight, tau, sparsity)
    ctx.softplus_count = softplus_count


def _sparse_linear_backward_formula(ctx, grad, grad_tau):
    stored, (input, weight, tau, sparsity) = saved_problem(ctx)
    problem = stored._replace(params=softplus_tail(stored.params, ctx.softplus_count))
    kernel_grads = any(ctx.needs_input_grad[:_PROBLEM_FIELDS])
    input_grad = ctx.needs_input_grad[_PROBLEM_FIELDS]
    grad_input, d_out, d_in, d_coeff, d_params = _sparse_linear_backward(
        *flat_problem(problem, grad, input, weight, sparsity, tau, input_grad, kernel_grads)
    )
    grad_bias = _tokens(grad).sum(0) if ctx.needs_input_grad[_PROBLEM_FIELDS + 2] else None
    if not input_grad:
        grad_input = None
    if not kernel_grads:
        d_out = d_in = d_coeff = d_params = None
    elif ctx.softplus_count:
        d_params = _softplus_tail_backward(d_params, stored.params, ctx.softplus_count)
    return *problem_gradients(d_out, d_in, d_coeff, d_params), grad_input, None, grad_bias, None, None, None


register_backward(
    _sparse_linear, "kernelized_sparse_delta", _sparse_linear_setup_context, _sparse_linear_backward_formula
)


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
    problem, sparsity, threshold = _checked(
        out_emb, in_emb, sparsity, kernel, mode, threshold, kernel_params, None
    )  # in the compute dtype: W0 + ΔW is summed there, from a ΔW not rounded to a half dtype
    input = check_tensor(input, "input", min_ndim=1)
    shape = problem.shape
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
    check_same_device({"input": input, "out_emb": problem.out_emb, **optional})
    return prepared_sparse_linear(problem, input, weight, bias, sparsity, threshold)


def prepared_sparse_linear(
    problem: KernelProblem, input: Tensor, weight: Tensor | None, bias: Tensor | None, sparsity: Tensor,
    threshold: str, softplus_count: int = 0,
) -> Tensor:  # fmt: skip
    """``sparse_linear`` on arguments already in the form its checks give them, not checked
    again: the problem's embeddings, ``coeff`` ``(H,)`` and ``params`` (alpha, beta, gamma)
    contiguous in one float32/float64 dtype on input's device, valid choices, ``sparsity`` a
    0-dim float64 cpu tensor, a frozen ``weight`` of the embeddings' shape or None; the last
    ``softplus_count`` of ``params`` in an adapter's stored form (``softplus_tail``). For a
    caller that builds them so on every forward (the SNELL layer), where the checks cost as
    much as a small layer's kernels."""
    return _sparse_linear(*flat_problem(problem, input, weight, bias, sparsity, threshold, softplus_count))[0]
