"""What the SNELL ops and their backends share: the problem they solve (``KernelProblem``),
W0 + ΔW, and ``sparse_linear_backward`` built from a backend's own two ops."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor



class KernelProblem(NamedTuple):
    """SNELL's problem, one bundle through the ops and the backends: ΔW_raw[j, i] =
    κ(b_j, a_i) by the kernel function ``kernel`` (its parameters ``coeff`` ``(H,)``,
    ``params`` (alpha, beta, gamma) and ``eps``), sparsified by ``mode`` (hard, soft; None:
    dense). The C++ ``Problem<T>`` of csrc/cpu/kernelized_rows.h holds the same fields (In
    there as (H, p, n); ``native.problem_arguments`` builds them). The sparsification's count
    k or threshold τ is an argument of each call: a selection runs the problem more than once."""

    out_emb: Tensor  # (H, m, p): the row vectors b_j
    in_emb: Tensor  # (H, n, p): the column vectors a_i
    kernel: str
    coeff: Tensor
    params: Tensor
    eps: float
    mode: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n), ΔW's shape."""
        return self.out_emb.shape[1], self.in_emb.shape[1]

    @property
    def is_empty(self) -> bool:
        """ΔW has no entries (m = 0 or n = 0)."""
        return self.out_emb.shape[1] == 0 or self.in_emb.shape[1] == 0

    def differentiable(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(out_emb, in_emb, coeff, params): the inputs that get gradients, in this order."""
        return self.out_emb, self.in_emb, self.coeff, self.params


PROBLEM_SCHEMA = "Tensor out_emb, Tensor in_emb, str kernel, Tensor coeff, Tensor params, float eps, str? mode"
"""A ``KernelProblem`` in a ``torch.library`` schema (which takes no NamedTuple): its fields,
first. ``flat_problem`` and ``with_problem`` are the one place a problem is flattened for a
schema and rebuilt from one."""
_FIELDS = len(KernelProblem._fields)


def flat_problem(problem: KernelProblem, *rest) -> tuple:
    """The arguments of an op whose schema starts with ``PROBLEM_SCHEMA``: the problem's
    fields, then ``rest``."""
    return (*problem, *rest)


def rebuilt_problem(args: tuple) -> tuple[KernelProblem, tuple]:
    """(the problem, the other arguments) from ``flat_problem``'s arguments."""
    return KernelProblem._make(args[:_FIELDS]), args[_FIELDS:]


def with_problem(function: Callable) -> Callable:
    """``function(problem, *rest)`` as a function of ``flat_problem``'s arguments (an op's
    implementation or fake)."""

    def rebuilt(*args):
        problem, rest = rebuilt_problem(args)
        return function(problem, *rest)

    return rebuilt


def problem_gradients(d_out, d_in, d_coeff, d_params) -> tuple:
    """The gradients of ``flat_problem``'s problem fields: None for the non-tensor ones."""
    return d_out, d_in, None, d_coeff, d_params, None, None


def effective_weight(delta: Tensor, weight: Tensor | None) -> Tensor:
    """W0 + ΔW (ΔW alone without a ``weight``), summed into ΔW's fresh buffer where its dtype
    holds the sum (a new m×n tensor is a pass of the system's page zeroing more), else in
    the wider dtype."""
    if weight is None:
        return delta
    if torch.promote_types(delta.dtype, weight.dtype) == delta.dtype:
        return delta.add_(weight)
    return weight + delta


def sparse_linear_backward_from_dense(forward, backward, grad_out, input, weight, problem, sparsity, tau,
                                      grad_for_input) -> list[Tensor]:  # fmt: skip
    """The op ``sparse_linear_backward`` of a backend whose ``kernelized_sparse_delta`` is
    ``forward`` and whose backward of it is ``backward``: Γ = grad_outᵀ·input formed whole by a
    matrix product (on a GPU it runs on the tensor cores, faster than gathering the kept
    entries), and, given ``grad_for_input`` (grad_out in the dtype ∂input takes), ∂input =
    grad_for_input·(W0 + ΔW) with the sparsified ΔW made by the forward with the saved τ
    (an empty tensor otherwise)."""
    gradients = backward(grad_out.t() @ input, problem, tau)
    if grad_for_input is None:
        return [input.new_empty(0), *gradients]
    delta = forward(problem, 0, tau)[0]
    return [grad_for_input @ effective_weight(delta, weight).to(grad_for_input.dtype), *gradients]
