"""``lowrank_hadamard_merge``: the LieRA (Hadamard group) merge W0 ⊙ exp(s·B·A).

``exp="exact"``: W_eff = W0 ⊙ exp(ΔW); ``exp="taylor1"`` (the authors' released form):
W_eff = W0 ⊙ (1 + ΔW). With ΔW = s·B·A on the matrix view of W0. Backward:
∂L/∂ΔW = Γ ⊙ W_eff (exact) or Γ ⊙ W0 (taylor1), then ∂L/∂B = s·∂L/∂ΔW·Aᵀ and
∂L/∂A = s·Bᵀ·∂L/∂ΔW; W_eff is recomputed, nothing of W0's size is saved. W0 is
frozen and gets no gradient; its zero entries never move. The exponential is taken
in at least float32; a result too large for W0's dtype becomes inf (adapters refuse
to merge non-finite weights)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends.registry import run
from ..config import EXP_FORMS, check_choice, check_real
from ._common import (
    check_frozen, check_same_device, check_tensor, custom_op, forward_backend, prepare, record_backend,
    register_backward,
)  # fmt: skip


def _vanishes(weight: Tensor, B: Tensor) -> bool:
    """W0 has no entries, or the rank is 0 (ΔW = 0: the merge is W0, the gradients zero)."""
    return weight.numel() == 0 or B.shape[1] == 0


@custom_op("lowrank_hadamard_merge", fake=lambda weight, B, A, scale, exp: torch.empty_like(weight))
def _lowrank_hadamard_merge(weight: Tensor, B: Tensor, A: Tensor, scale: float, exp: str) -> Tensor:
    """The merge on the selected backend."""
    if _vanishes(weight, B):
        return weight.clone()
    return run("lowrank_hadamard_merge", weight.device, weight, B, A, scale, exp)


def _fake_merge_backward(grad, weight, B, A, scale, exp):
    return [torch.empty_like(B), torch.empty_like(A)]


@custom_op("lowrank_hadamard_merge_backward", fake=_fake_merge_backward)
def _lowrank_hadamard_merge_backward(
    grad: Tensor, weight: Tensor, B: Tensor, A: Tensor, scale: float, exp: str
) -> list[Tensor]:
    """The merge's backward on the selected backend."""
    if _vanishes(weight, B):
        return [torch.zeros_like(B), torch.zeros_like(A)]
    return run("lowrank_hadamard_merge_backward", weight.device, grad, weight, B, A, scale, exp)


def _setup_context(ctx, inputs, output):
    weight, B, A, scale, exp = inputs
    ctx.save_for_backward(weight, B, A)
    ctx.scale, ctx.exp = scale, exp


def _backward(ctx, grad):
    weight, B, A = ctx.saved_tensors
    d_B, d_A = _lowrank_hadamard_merge_backward(grad.contiguous(), weight, B, A, ctx.scale, ctx.exp)
    return None, d_B, d_A, None, None


register_backward(_lowrank_hadamard_merge, "lowrank_hadamard_merge", _setup_context, _backward)


def lowrank_hadamard_merge(
    weight: Tensor, B: Tensor, A: Tensor, scale: float, exp: str = "exact"
) -> Tensor:
    """W0 ⊙ exp(scale · B · A) (or W0 ⊙ (1 + scale · B · A) for ``exp="taylor1"``), fused.

    weight: ``(m, ...)`` (Linear or ConvNd layout); B: ``(m, r)``; A: ``(r, n)`` with
    ``n = prod(weight.shape[1:])``, or ``(r, *weight.shape[1:])`` (conv A keeps its
    spatial structure). Returns weight's shape and dtype; weight gets no gradient."""
    weight = check_tensor(weight, "weight", min_ndim=2)
    B = check_tensor(B, "B", ndim=2)
    A = check_tensor(A, "A", min_ndim=2)
    scale = check_real(scale, "scale")
    exp = check_choice(exp, "exp", EXP_FORMS)
    rows, cols = weight.shape[0], math.prod(weight.shape[1:])
    rank = B.shape[1]
    if B.shape[0] != rows:
        raise ValueError(f"B must have shape ({rows}, r) for weight {tuple(weight.shape)}, got {tuple(B.shape)}")
    if tuple(A.shape) not in ((rank, cols), (rank, *weight.shape[1:])):
        raise ValueError(
            f"A must have shape ({rank}, {cols}) or ({rank}, *weight.shape[1:]) for B of rank "
            f"{rank} and weight {tuple(weight.shape)}, got {tuple(A.shape)}"
        )
    check_same_device({"weight": weight, "B": B, "A": A})
    check_frozen(weight)
    computed_weight, B, A = prepare("lowrank_hadamard_merge", weight, B, A.reshape(rank, cols))
    return _lowrank_hadamard_merge(computed_weight, B, A, scale, exp).to(weight.dtype)


# --------------------------------------------------------------------------- in a linear layer


def _tokens(tensor: Tensor) -> Tensor:
    """(tokens, features): the leading dimensions flattened."""
    return tensor.reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1])


ROW_BLOCK = 1024
ROW_BLOCK_ELEMENTS = 1 << 22
"""Rows per block of ``hadamard_linear``: ``ROW_BLOCK``, fewer for a wide weight so that a
block holds at most ``ROW_BLOCK_ELEMENTS`` entries (16 MiB of float32: glibc gives larger
blocks back to the system when they are freed, and every block would then be fresh pages,
zeroed by the kernel). Each block costs a pass over the input (forward, Γ) and a read and
write of ∂input (its rank-``ROW_BLOCK`` update) besides its share of W0, so blocks pay when
they hold about as many rows as there are tokens or more (measured at LLaMA's shapes:
docs/performance.md). A weight of fewer than 2·``ROW_BLOCK`` rows runs in two blocks at
least, so that backward's W_eff[R] and Γ[R], alive together, hold no more than one m×n
tensor did. Fixed counts, so that the results do not depend on the thread count."""


def _row_block(rows: int, columns: int) -> int:
    """Rows per block of ``hadamard_linear`` for a weight (rows, columns): see ``ROW_BLOCK``."""
    return max(1, min(ROW_BLOCK, ROW_BLOCK_ELEMENTS // max(1, columns), -(-rows // 2)))


DEQUANTIZED_ROW_BLOCK_ELEMENTS = 1 << 18
"""About how many entries a block of ``hadamard_update_linear`` holds: 1 MiB of float32
rows of a quantized base dequantized at a time, so that its temporaries stay far below
one weight-sized float32 tensor (the memory the quantization saves)."""

RowSource = Callable[[int, int], Tensor]
"""``rows(start, stop)``: rows ``start:stop`` of W0, contiguous (a slice, or rows dequantized)."""


def dequantized_block_rows(rows: int, cols: int, granularity: int) -> int:
    """Rows per block of a quantized base: about ``DEQUANTIZED_ROW_BLOCK_ELEMENTS`` entries,
    a multiple of ``granularity`` (the rows that start its quantization blocks), at most
    all the rows."""
    count = max(1, DEQUANTIZED_ROW_BLOCK_ELEMENTS // max(1, cols))
    return max(1, min(-(-count // granularity) * granularity, rows))


def _rows_of(weight: Tensor | None, rows: RowSource | None, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of W0: of ``weight``, or from ``rows`` where W0 is quantized."""
    return weight[start:stop] if rows is None else rows(start, stop)


def _blocks(rows: int, block: int) -> list[tuple[int, int]]:
    """(start, stop) of each block of ``block`` rows, in order (one empty block for no rows,
    so that the result still gets its shape and dtype from ``F.linear``)."""
    return [(start, min(start + block, rows)) for start in range(0, max(rows, 1), block)]


def _merged_rows(weight_rows: Tensor, B_rows: Tensor, A: Tensor, scale: float, exp: str) -> Tensor:
    """W_eff of one block of rows, by the merge kernel."""
    return _lowrank_hadamard_merge(weight_rows, B_rows, A, scale, exp)


class _HadamardLinear(torch.autograd.Function):
    """``F.linear(input, W0 ⊙ exp(s·B·A), bias)`` over blocks of ``block`` rows of W0,
    keeping nothing of W0's size for backward (``subtract``: with W_eff − W0 instead).

    Forward: W_eff[R] by the merge kernel, y[:, R] = x·W_eff[R]ᵀ (+ bias[R]). Backward, per
    block: W_eff[R] again, ∂x += g[:, R]·W_eff[R], Γ[R] = g[:, R]ᵀ·x, and the merge's
    backward of Γ[R] gives ∂B[R] and this block's part of ∂A, added in block order; for
    ``exp="exact"`` its ∂L/∂ΔW = Γ ⊙ W_eff is taken from the W_eff[R] just made (the
    kernel's taylor1 form Γ ⊙ W with W = W_eff) instead of computing exp(ΔW) again. No
    m×n tensor exists at any time. W0's rows are ``weight``'s, or where ``weight`` is None
    those ``rows`` gives (a quantized base dequantizing them)."""

    @staticmethod
    def forward(ctx, input, weight, bias, B, A, scale, exp, rows, block, subtract):
        ctx.save_for_backward(input, weight, B, A)
        ctx.rows, ctx.block, ctx.scale, ctx.exp, ctx.subtract = rows, block, scale, exp, subtract
        if torch.compiler.is_compiling():
            ctx.backend = None
        else:
            record_backend(ctx, "lowrank_hadamard_merge", input.device)
        x, m = _tokens(input), B.shape[0]
        out = None
        for start, stop in _blocks(m, block):
            weight_rows = merged = part = None  # the last block's tensors go before this block's are made
            weight_rows = _rows_of(weight, rows, start, stop)
            merged = _merged_rows(weight_rows, B[start:stop], A, scale, exp)
            if subtract:
                merged = merged - weight_rows
            part = F.linear(x, merged.to(input.dtype), None if bias is None else bias[start:stop])
            if out is None:  # in the dtype F.linear gives (autocast's, inside a region)
                out = part.new_empty(x.shape[0], m)
            out[:, start:stop] = part
        return out.reshape(*input.shape[:-1], m)

    @staticmethod
    def backward(ctx, grad):
        input, weight, B, A = ctx.saved_tensors
        rows, block, scale, exp = ctx.rows, ctx.block, ctx.scale, ctx.exp
        wants_input, wants_factors = ctx.needs_input_grad[0], ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        grad_input = grad_bias = d_B = d_A = None
        g, x, m = _tokens(grad), _tokens(input), B.shape[0]
        if wants_factors:
            product_dtype = torch.promote_types(grad.dtype, input.dtype)  # they differ under autocast
            g_product, x_product = g.to(product_dtype), x.to(product_dtype)
            d_B = torch.empty_like(B)
        if wants_input:  # summed over the blocks in at least float32, rounded once
            sum_dtype = torch.promote_types(grad.dtype, torch.float32)
            grad_input, g_sum = g.new_zeros(x.shape, dtype=sum_dtype), g.to(sum_dtype)
        with forward_backend(ctx):
            for start, stop in _blocks(m, block):
                weight_rows = merged = reduced = gamma = None  # the last block's go before this block's are made
                weight_rows, B_rows = _rows_of(weight, rows, start, stop), B[start:stop]
                reduced, reduced_exp = weight_rows, exp  # what the merge's backward reads
                if wants_input:
                    merged = _merged_rows(weight_rows, B_rows, A, scale, exp)
                    if exp == "exact" and merged.dtype == B.dtype:  # W_eff unrounded: Γ ⊙ W_eff from it
                        reduced, reduced_exp = merged, "taylor1"
                    if ctx.subtract:
                        merged = merged - weight_rows
                    grad_input.addmm_(g_sum[:, start:stop], merged.to(input.dtype).to(sum_dtype))
                if wants_factors:
                    gamma = (g_product[:, start:stop].T @ x_product).to(weight_rows.dtype)
                    d_B[start:stop], d_A_block = _lowrank_hadamard_merge_backward(
                        gamma, reduced, B_rows, A, scale, reduced_exp
                    )
                    d_A = d_A_block if d_A is None else d_A.add_(d_A_block)  # in block order
        if wants_input:
            grad_input = grad_input.to(grad.dtype).reshape(input.shape)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_input, None, grad_bias, d_B, d_A, None, None, None, None, None


def hadamard_linear(
    input: Tensor, weight: Tensor, bias: Tensor | None, B: Tensor, A: Tensor, scale: float, exp: str = "exact"
) -> Tensor:
    """``F.linear(input, W0 ⊙ exp(s·B·A), bias)`` for a frozen ``weight`` W0 (m, n), B (m, r),
    A (r, n), the merged weight computed as ``lowrank_hadamard_merge`` computes it and rounded
    once to ``input``'s dtype; run over blocks of rows (``_row_block``), so that W_eff and Γ
    exist a block at a time and nothing of W0's size is kept for backward."""
    input = check_tensor(input, "input", min_ndim=1)
    weight = check_tensor(weight, "weight", ndim=2)
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input's last dimension must be weight's {weight.shape[1]} columns, got {tuple(input.shape)}")
    if bias is not None and tuple(check_tensor(bias, "bias").shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) (the weight's rows), got {tuple(bias.shape)}")
    B = check_tensor(B, "B", ndim=2)
    A = check_tensor(A, "A", ndim=2)
    scale = check_real(scale, "scale")
    exp = check_choice(exp, "exp", EXP_FORMS)
    if B.shape[0] != weight.shape[0] or tuple(A.shape) != (B.shape[1], weight.shape[1]):
        raise ValueError(
            f"B (m, r) and A (r, n) must match weight {tuple(weight.shape)}, got {tuple(B.shape)} and {tuple(A.shape)}"
        )
    check_same_device({"input": input, "weight": weight, "B": B, "A": A})
    check_frozen(weight)
    computed_weight, B, A = prepare("lowrank_hadamard_merge", weight, B, A)
    block = _row_block(*weight.shape)
    return _HadamardLinear.apply(input, computed_weight, bias, B, A, scale, exp, None, block, False)


def hadamard_update_linear(
    input: Tensor, rows: RowSource, B: Tensor, A: Tensor, scale: float, exp: str, granularity: int
) -> Tensor:
    """``F.linear(input, W0 ⊙ exp(s·B·A) − W0)`` for a W0 given by its rows: ``rows(start,
    stop)`` (contiguous, in ``input``'s dtype, as B and A), asked for blocks that start at
    multiples of ``granularity`` rows (a quantized base dequantizing them: its update's
    path, beside the base layer's own quantized forward). No m×n tensor is formed."""
    block = dequantized_block_rows(B.shape[0], A.shape[1], granularity)
    return _HadamardLinear.apply(input, None, None, B, A, scale, exp, rows, block, True)
