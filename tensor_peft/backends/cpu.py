"""The ``cpu`` backend: C++17/OpenMP kernels of the compiled extension ``tensor_peft._C``.

Tensors reach the kernels (``native.cpu_kernels``) as raw pointers: the op layer has
checked their shapes and made them contiguous float32/float64 on one device. Each op is a function registered
with ``@register(op, "cpu")``, the Tucker and hadamard ops by ``tucker_split.register_ops``.

The kernels: ``csrc/cpu/lowrank.cpp`` handles updates ΔW = s·U·R with U, R thin, one
pass over W0 or Γ: the Tucker ops after the split of ``tucker_split`` (U = U_0), and
LieRA's ``lowrank_hadamard_merge`` (U = B, R = A) with its exp / taylor1 epilogue.
``csrc/cpu/expm.cpp`` is the batched ``matrix_exp`` and its adjoint Fréchet backward.
``csrc/cpu/kernelized.cpp`` is SNELL's kernelized update and its sparsification (radix
select of the threshold), fused, with a backward that recomputes the rows (its rows,
selection and backward in the ``kernelized_*.h`` beside it). FLoRA's
projected gradients are small contractions in plain torch (``tensor_algebra``)."""

from __future__ import annotations

import torch

from . import tucker_split
from .kernelized_ops import KernelProblem, effective_weight
from .native import C, CpuKernels, cpu_kernels, mode_id, problem_arguments
from .registry import register

DEVICE_TYPES = ("cpu",)


def unavailable_reason(device_type: str) -> str | None:
    return C.import_error()



def _kernels(dtype: torch.dtype) -> CpuKernels:
    """The _C kernels for ``dtype``, the extension's OpenMP threads first set to
    ``torch.get_num_threads()`` for this thread: ``torch.set_num_threads`` governs both (the
    extension may link another OpenMP runtime than torch's). Results do not depend on it."""
    C.module().set_max_threads(torch.get_num_threads())
    return cpu_kernels(dtype)


def _forward(out, weight, U, R, d0, r0, n, scale, epilogue="add"):
    _kernels(out.dtype).lowrank_forward(
        out=out.data_ptr(), weight=0 if weight is None else weight.data_ptr(), U=U.data_ptr(), R=R.data_ptr(),
        d0=d0, r0=r0, n=n, scale=scale, epilogue=C.module().EPILOGUE_IDS[epilogue],
    )  # fmt: skip


def _backward(grad, weight, U, R, d_U, d_R, d0, r0, n, scale, epilogue="add"):
    _kernels(grad.dtype).lowrank_backward(
        grad=grad.data_ptr(), weight=0 if weight is None else weight.data_ptr(), U=U.data_ptr(), R=R.data_ptr(),
        d0=d0, r0=r0, n=n, scale=scale, epilogue=C.module().EPILOGUE_IDS[epilogue], dU=d_U.data_ptr(),
        dR=d_R.data_ptr(),
    )  # fmt: skip


tucker_split.register_ops("cpu", _forward, _backward)


# The largest n of matrix_exp: the kernels index a matrix's n² entries with a 32-bit int.
MAX_MATRIX_SIZE = 46340


def _matrices(A) -> tuple[int, int]:
    """(batch, n) of a (..., n, n) tensor (batch 0 when it is empty); n checked first."""
    n = A.shape[-1]
    if n > MAX_MATRIX_SIZE:
        raise ValueError(f"A: the cpu backend's matrix_exp takes n ≤ {MAX_MATRIX_SIZE}, got n = {n}")
    return (A.numel() // (n * n) if n else 0), n


@register("matrix_exp", "cpu")
def matrix_exp(A):
    batch, n = _matrices(A)
    out = A.new_empty(A.shape)
    _kernels(A.dtype).matrix_exp(out=out.data_ptr(), A=A.data_ptr(), batch=batch, n=n)
    return out


@register("matrix_exp_backward", "cpu")
def matrix_exp_backward(grad, A):
    batch, n = _matrices(A)
    d_A = A.new_empty(A.shape)
    _kernels(A.dtype).matrix_exp_backward(d_A=d_A.data_ptr(), grad=grad.data_ptr(), A=A.data_ptr(), batch=batch, n=n)
    return d_A


def _transposed_gradients(backward, upstream, problem: KernelProblem, in_t, tau, delta=None, base=None):
    """[∂out_emb, ∂in_t, ∂coeff, ∂params] by the _C kernel ``backward`` (which takes the
    ``upstream`` keyword arguments, its pointers and sizes, too) for In given as ``in_t``
    (H, p, n), writing the sparsified ΔW into ``delta`` when given, W0 + ΔW given W0's
    ``base`` (its rows unit-stride, in delta's dtype)."""
    d_out, d_in_t = torch.empty_like(problem.out_emb), torch.empty_like(in_t)
    d_coeff, d_params = torch.empty_like(problem.coeff), torch.empty_like(problem.params)
    backward(
        **upstream, **problem_arguments(problem, in_t, C.module()), tau=0.0 if tau is None else tau.item(),
        d_out_emb=d_out.data_ptr(), d_in_t=d_in_t.data_ptr(), d_coeff=d_coeff.data_ptr(),
        d_params=d_params.data_ptr(), delta=0 if delta is None else delta.data_ptr(),
        weight=0 if base is None else base.data_ptr(), weight_stride=0 if base is None else base.stride(0),
    )  # fmt: skip
    return [d_out, d_in_t, d_coeff, d_params]


@register("kernelized_sparse_delta", "cpu")
def kernelized_sparse_delta(problem: KernelProblem, k, tau=None):
    """[ΔW, τ]: κ(Out, In), sparsified when ``problem.mode`` is given (None: the dense op), by
    ``tau`` or else by the k-th smallest magnitude (the kernel selects when k > 0). In goes
    in as (H, p, n)."""
    out, in_t = problem.out_emb.new_empty(problem.shape), problem.in_emb.transpose(1, 2).contiguous()  # kept alive
    given = float("-inf") if tau is None else tau.item()
    tau = _kernels(out.dtype).kernelized_forward(
        out=out.data_ptr(), **problem_arguments(problem, in_t, C.module()), k=0 if tau is not None else k,
        given_tau=given,
    )  # fmt: skip
    return [out, out.new_tensor(tau)]


@register("kernelized_sparse_delta_backward", "cpu")
def kernelized_sparse_delta_backward(grad, problem: KernelProblem, tau):
    backward = _kernels(problem.out_emb.dtype).kernelized_backward
    in_t = problem.in_emb.transpose(1, 2).contiguous()
    d_out, d_in_t, d_coeff, d_params = _transposed_gradients(backward, {"grad": grad.data_ptr()}, problem, in_t, tau)
    return [d_out, d_in_t.transpose(1, 2).contiguous(), d_coeff, d_params]


# Γ is sampled below this kept fraction and from this many tokens, else formed whole by the
# matrix product. Sampling costs a pass of κ more than the dense path (the mask before the
# products), which only a long matrix product outweighs, and its products run slower than
# the matrix product's: it pays only when few entries are kept and many tokens share them.
# The thresholds come from timing both paths at SNELL's real shapes (benchmarks/
# test_real_shapes.py; the timings are in benchmarks/results/real-shapes-*.md).
_SAMPLED_BELOW = 0.05
_SAMPLED_MIN_TOKENS = 1024
_MAX_SAMPLED_COLUMNS = 2**31 - 1  # a kept entry holds its column in 32 bits


# Values (m × columns) a column block of the backward holds per tensor: Γ's, ΔW's and
# W0 + ΔW's columns of a block, about 4 MiB each in float32; at least 256 columns (a tall
# weight's narrower blocks cost more time than they save: docs/performance.md).
_BLOCK_VALUES = 1 << 20
_MIN_BLOCK_COLUMNS = 256
_BLOCK_COLUMNS_MULTIPLE = 64  # whole vectors: a block's entries get the bits of the whole ΔW's


def _block_columns(m: int, n: int) -> int:
    """The columns of a block of ``sparse_linear_backward`` for a weight (m, n): about
    _BLOCK_VALUES values, a multiple of _BLOCK_COLUMNS_MULTIPLE, at least
    _MIN_BLOCK_COLUMNS, at most n.
    Fixed by the shape alone: the result's bits do not depend on the threads."""
    columns = max(_BLOCK_VALUES // max(m, 1) // _BLOCK_COLUMNS_MULTIPLE, 1) * _BLOCK_COLUMNS_MULTIPLE
    return min(max(columns, _MIN_BLOCK_COLUMNS), n)


def _takes_base(weight, delta) -> bool:
    """Whether the kernel can write W0 + ΔW itself: W0's rows unit-stride in ΔW's dtype (a
    wider W0 is summed in its own dtype by effective_weight)."""
    return weight is not None and weight.dtype == delta.dtype and weight.stride(1) == 1


@register("sparse_linear_backward", "cpu")
def sparse_linear_backward(grad_out, input, weight, problem: KernelProblem, sparsity, tau, grad_for_input):
    """In column blocks C of the weight (``_block_columns``), each the kernel's whole problem
    on In's columns C (mixture's softmax runs down each column: a block holds whole
    columns): Γ[:, C] = grad_outᵀ·input[:, C] by the matrix product, or computed by the
    kernel only where the mask keeps an entry (when at most _SAMPLED_BELOW of the entries
    are kept and there are at least _SAMPLED_MIN_TOKENS tokens); the kernel's gradients,
    which write the block's sparsified ΔW[:, C] on the way (added onto W0[:, C] there when
    W0 is in the kernel's dtype); and, given ``grad_for_input`` (grad_out in the dtype
    ∂input takes), ∂input[:, C] = grad_for_input·(W0 + ΔW)[:, C].
    Nothing m×n exists at once. ∂out_emb, ∂coeff and ∂params are summed over the blocks in
    block order."""
    out_emb, in_emb, _, coeff, params, _, _ = problem
    m = out_emb.shape[1]
    tokens, n = input.shape
    sampled = 1 - sparsity <= _SAMPLED_BELOW and tokens >= _SAMPLED_MIN_TOKENS
    if sampled and n > _MAX_SAMPLED_COLUMNS:
        raise ValueError(
            f"in_emb: the cpu backend's sampled backward takes n ≤ {_MAX_SAMPLED_COLUMNS} columns, got {n}"
        )
    in_t = in_emb.transpose(1, 2).contiguous()
    d_out, d_in_t = torch.zeros_like(out_emb), torch.empty_like(in_t)
    d_coeff, d_params = torch.zeros_like(coeff), torch.zeros_like(params)
    input_grad = grad_for_input is not None
    grad_input = grad_for_input.new_empty(tokens, n) if input_grad else input.new_empty(0)
    step, kernels = _block_columns(m, n), _kernels(out_emb.dtype)
    for start in range(0, n, step):
        columns = slice(start, min(start + step, n))
        block_input = input[:, columns].contiguous()  # kept alive for the call, as the tensors below
        if sampled:
            backward = kernels.sparse_linear_backward
            upstream = {"grad_out": grad_out.data_ptr(), "input": block_input.data_ptr(), "tokens": tokens}
        else:
            gamma = grad_out.t() @ block_input
            backward, upstream = kernels.kernelized_backward, {"grad": gamma.data_ptr()}
        delta = out_emb.new_empty(m, block_input.shape[1]) if input_grad else None
        block_weight = None if weight is None or not input_grad else weight[:, columns]
        base = block_weight if _takes_base(block_weight, delta) else None
        block_out, d_in_t[:, :, columns], block_coeff, block_params = _transposed_gradients(
            backward, upstream, problem, in_t[:, :, columns].contiguous(), tau, delta, base
        )  # fmt: skip
        d_out += block_out
        d_coeff += block_coeff
        d_params += block_params
        if input_grad:
            effective = delta if base is not None else effective_weight(delta, block_weight)
            grad_input[:, columns] = grad_for_input @ effective.to(grad_input.dtype)
    return [grad_input, d_out, d_in_t.transpose(1, 2).contiguous(), d_coeff, d_params]


@register("sparsify", "cpu")
def sparsify(delta, k, mode):
    out = torch.empty_like(delta)
    tau = _kernels(delta.dtype).sparsify(
        out=out.data_ptr(), delta=delta.data_ptr(), count=delta.numel(), k=k, mode=mode_id(mode, C.module())
    )
    return [out, delta.new_tensor(tau)]


@register("sparsify_backward", "cpu")
def sparsify_backward(grad, delta, tau, mode):
    d_delta = torch.empty_like(delta)
    _kernels(delta.dtype).sparsify_backward(
        d_delta=d_delta.data_ptr(), grad=grad.data_ptr(), delta=delta.data_ptr(), count=delta.numel(), tau=tau.item(),
        mode=mode_id(mode, C.module()),
    )
    return d_delta
