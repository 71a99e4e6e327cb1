"""Triton kernels for SNELL: the kernelized update ΔW_raw[j, i] = κ(b_j, a_i), its
competition sparsification and the backward of both, with nothing m×n kept between them.

- ``delta_kernel``: one (BM × BN) tile of ΔW_raw per program, κ from the embeddings
  (distances from direct differences, exact near 0), mixture's softmax term from column
  statistics computed before; when a threshold follows, the tile also counts the first
  radix digit of its magnitudes. The threshold and the mask are ``select.py``'s.
- ``backward_kernel``: one tile of Γ per program; recomputes the tile of κ, applies the
  mask's derivative and mixture's softmax Jacobian, and reduces into the embedding
  gradients (∂b_j = rowsum(W)·b_j − W·a, ∂a_i = colsum(W)·a_i − Wᵀ·b per chunk for the
  distance kernel functions, W·a and Wᵀ·b for the dot-product ones) and the kernel
  function's parameters, with atomic adds.
- ``columns_kernel``: mixture's per-column passes over all rows: the softmax's max and
  sum (online), and for the backward c_i = Σ_j D_ji S_ji.
Dtypes: κ, τ and the mask are computed in the kernel function's parameters' dtype (the
compute dtype), and so are the embedding gradients' sums; the parameter gradients sum
over all m·n entries in float64. Float16/bfloat16 embeddings, Γ and ΔW are read and
written in their own dtype (with a sparsity, κ goes through a buffer in the compute dtype
before the mask rounds it into a half ΔW once; half gradients are summed in
compute-dtype buffers, then cast).
Written for the interpreter too (``TRITON_INTERPRET=1``): masked loads, IEEE-precision
dots, exp and division by ``shared`` (libdevice exp, IEEE division on a GPU), ``eps``
passed as float64. Float atomics (nondeterministic summation order): ``backward_kernel``'s
embedding and parameter gradients."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...config import KERNELS
from ..determinism import check_deterministic
from ..kernelized_ops import KernelProblem, sparse_linear_backward_from_dense
from ..native import kernel_id, mode_id
from ..registry import register
from .select import BINS, _count_digits, _kth_smallest_magnitude, _mask, _mask_factor, _new_counts, _shifts
from .shared import div, exp, launch, rounded, scalar, tile, tile_grid

BLOCK_M, BLOCK_N = 32, 32
# Globals that kernels read must be constexpr.
PIECEWISE, RBF, SIGMOID, LINEAR, MIXTURE = (tl.constexpr(kernel_id(name)) for name in KERNELS)


# The kernels that loop over the embeddings' chunks and dimensions take ``chunks`` and
# ``width`` unspecialized: Triton would make a 1 a constant (its loop unrolled) and mark a
# multiple of 16, compiles of their own that spill registers on sm_80 (chunks = 1,
# width = 1, width = 32).
layout_jit = triton.jit(do_not_specialize=["chunks", "width"])


@triton.jit
def _sqrt(x):
    """The correctly rounded square root (float32 ``tl.sqrt`` may be approximate)."""
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    return tl.sqrt(x)


@triton.jit
def _chunk_sums(out_emb, in_emb, first, last, rows, cols, m, n, width,
                DOT: tl.constexpr, COMPUTE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """Σ over chunks first ≤ h < last of ‖b_j^h − a_i^h‖² (from direct differences, exact
    near 0) or, DOT, of b_j^h·a_i^h, on a tile, in COMPUTE."""
    row_in, col_in = rows < m, cols < n
    acc = tl.zeros((BM, BN), dtype=COMPUTE)
    for step in range(first * width, last * width):  # (chunk h, dimension d) = divmod(step, width)
        h = step // width
        d = step - h * width
        b = tl.load(out_emb + (h * m + rows) * width + d, mask=row_in, other=0.0).to(COMPUTE)
        a = tl.load(in_emb + (h * n + cols) * width + d, mask=col_in, other=0.0).to(COMPUTE)
        if DOT:
            acc += b[:, None] * a[None, :]
        else:
            diff = b[:, None] - a[None, :]
            acc += diff * diff
    return acc


@triton.jit
def _base_tile(out_emb, in_emb, coeff, alpha, beta, gamma, eps, rows, cols, m, n, chunks, width,
               KERNEL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """κ on a tile, before mixture's softmax term (for mixture: the piecewise part P), in
    the kernel parameters' dtype (the compute dtype)."""
    COMPUTE: tl.constexpr = alpha.dtype
    if KERNEL == PIECEWISE or KERNEL == MIXTURE:
        acc = tl.zeros((BM, BN), dtype=COMPUTE)
        for h in range(chunks):
            squares = _chunk_sums(out_emb, in_emb, h, h + 1, rows, cols, m, n, width, False, COMPUTE, BM, BN)
            acc += tl.load(coeff + h).to(COMPUTE) * _sqrt(squares + scalar(eps, COMPUTE))
    elif KERNEL == RBF:
        squares = _chunk_sums(out_emb, in_emb, 0, chunks, rows, cols, m, n, width, False, COMPUTE, BM, BN)
        acc = alpha * exp(-beta * squares) + gamma
    else:
        acc = _chunk_sums(out_emb, in_emb, 0, chunks, rows, cols, m, n, width, True, COMPUTE, BM, BN)
        if KERNEL == SIGMOID:
            acc = div(alpha, 1.0 + exp(-beta * acc)) + gamma
    return acc


@triton.jit
def _softmax(piecewise, gamma, column_max, column_sum, cols, n):
    """Mixture's S = softmax_j(P/gamma) on a tile, from the columns' max of P and sum."""
    col_in = cols < n
    top = tl.load(column_max + cols, mask=col_in, other=0.0)
    total = tl.load(column_sum + cols, mask=col_in, other=1.0)
    return div(exp(div(piecewise - top[None, :], gamma)), total[None, :])


@layout_jit
def delta_kernel(out, out_emb, in_emb, coeff, kernel_params, column_max, column_sum, counts, shift,
                 m, n, chunks, width, eps: tl.float64,
                 KERNEL: tl.constexpr, COUNT: tl.constexpr, DOUBLE: tl.constexpr, BINS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    rows, cols = tile(m, n, BM, BN)
    alpha, beta, gamma = tl.load(kernel_params), tl.load(kernel_params + 1), tl.load(kernel_params + 2)
    value = _base_tile(out_emb, in_emb, coeff, alpha, beta, gamma, eps, rows, cols, m, n, chunks, width,
                       KERNEL, BM, BN)  # fmt: skip
    if KERNEL == MIXTURE:
        value += alpha * _softmax(value, gamma, column_max, column_sum, cols, n) + beta
    inside = (rows[:, None] < m) & (cols[None, :] < n)
    tl.store(out + rows[:, None] * n + cols[None, :], rounded(value, out.dtype.element_ty), mask=inside)
    if COUNT:  # the first radix pass: no digits found yet
        _count_digits(tl.reshape(value, (BM * BN,)), tl.reshape(inside, (BM * BN,)), counts, 0, 0, shift,
                      DOUBLE, BINS)  # fmt: skip


@layout_jit
def columns_kernel(grad, out_emb, in_emb, coeff, kernel_params, tau, column_max, column_sum, column_dot,
                   m, n, chunks, width, eps: tl.float64,
                   MODE: tl.constexpr, DOT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    """Mixture, one block of columns over all rows: M_i = max_j P_ji and Σ_j exp((P_ji − M_i)/gamma)
    (online; the max of P, not of P/gamma, so that a small gamma divides the differences
    only), or (DOT) c_i = Σ_j D_ji S_ji with D = ∂L/∂K after the mask's derivative."""
    cols = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)
    alpha, beta, gamma = tl.load(kernel_params), tl.load(kernel_params + 1), tl.load(kernel_params + 2)
    top = tl.full((BN,), float("-inf"), dtype=alpha.dtype)
    total = tl.zeros((BN,), dtype=alpha.dtype)
    for start in range(0, m, BM):
        rows = (start + tl.arange(0, BM)).to(tl.int64)
        row_in = rows < m
        piecewise = _base_tile(out_emb, in_emb, coeff, alpha, beta, gamma, eps, rows, cols, m, n, chunks, width,
                               MIXTURE, BM, BN)  # fmt: skip
        if DOT:
            soft = _softmax(piecewise, gamma, column_max, column_sum, cols, n)
            inside = row_in[:, None] & (cols[None, :] < n)
            D = tl.load(grad + rows[:, None] * n + cols[None, :], mask=inside, other=0.0).to(alpha.dtype)
            if MODE != 0:
                D *= _mask_factor(piecewise + (alpha * soft + beta), tl.load(tau), MODE, True)  # the forward's order
            total += tl.sum(tl.where(inside, D * soft, 0.0), 0)
        else:
            values = tl.where(row_in[:, None], piecewise, float("-inf"))  # max of P, not of P/γ: (P − max P)/γ
            new_top = tl.maximum(top, tl.max(values, 0))  # stays accurate for a small γ
            total = total * exp(div(top - new_top, gamma)) + tl.sum(exp(div(values - new_top[None, :], gamma)), 0)
            top = new_top
    col_in = cols < n
    if DOT:
        tl.store(column_dot + cols, total, mask=col_in)
    else:
        tl.store(column_max + cols, top, mask=col_in)
        tl.store(column_sum + cols, total, mask=col_in)


@triton.jit
def _total(x):
    """The sum of a tile, in float64 (parameter gradients sum over all m·n entries)."""
    return tl.sum(tl.sum(x.to(tl.float64), 1), 0)


@triton.jit
def _embedding_gradients(W, out_emb, in_emb, d_out, d_in, h, rows, cols, m, n, width,
                         DISTANCE: tl.constexpr, BP: tl.constexpr):  # fmt: skip
    """Chunk h's share of this tile: distance kernels ∂b_j = Σ_i W_ji (b_j − a_i),
    ∂a_i = −Σ_j W_ji (b_j − a_i); dot-product kernels ∂b_j = Σ_i W_ji a_i, ∂a_i = Σ_j W_ji b_j."""
    dims = tl.arange(0, BP)
    b_at = (h * m + rows[:, None]) * width + dims[None, :]
    a_at = (h * n + cols[:, None]) * width + dims[None, :]
    b_in = (rows[:, None] < m) & (dims[None, :] < width)
    a_in = (cols[:, None] < n) & (dims[None, :] < width)
    b = tl.load(out_emb + b_at, mask=b_in, other=0.0).to(W.dtype)
    a = tl.load(in_emb + a_at, mask=a_in, other=0.0).to(W.dtype)
    d_b = tl.dot(W, a, input_precision="ieee")
    d_a = tl.dot(tl.trans(W), b, input_precision="ieee")
    if DISTANCE:
        d_b = tl.sum(W, 1)[:, None] * b - d_b
        d_a = tl.sum(W, 0)[:, None] * a - d_a
    tl.atomic_add(d_out + b_at, d_b, mask=b_in, sem="relaxed")
    tl.atomic_add(d_in + a_at, d_a, mask=a_in, sem="relaxed")


@layout_jit
def backward_kernel(grad, out_emb, in_emb, coeff, kernel_params, tau, column_max, column_sum, column_dot,
                    d_out, d_in, d_coeff, d_params, m, n, chunks, width, eps: tl.float64,
                    KERNEL: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BP: tl.constexpr):  # fmt: skip
    rows, cols = tile(m, n, BM, BN)
    inside = (rows[:, None] < m) & (cols[None, :] < n)
    alpha, beta, gamma = tl.load(kernel_params), tl.load(kernel_params + 1), tl.load(kernel_params + 2)
    D = tl.load(grad + rows[:, None] * n + cols[None, :], mask=inside, other=0.0).to(alpha.dtype)  # ∂L/∂K
    if KERNEL == MIXTURE or MODE != 0:
        value = _base_tile(out_emb, in_emb, coeff, alpha, beta, gamma, eps, rows, cols, m, n, chunks, width,
                           KERNEL, BM, BN)  # fmt: skip
        if KERNEL == MIXTURE:
            piecewise = value
            soft = _softmax(piecewise, gamma, column_max, column_sum, cols, n)
            value = piecewise + (alpha * soft + beta)  # the forward's order: the same bits at τ
        if MODE != 0:
            D *= _mask_factor(value, tl.load(tau), MODE, True)
        if KERNEL == MIXTURE:  # ∂L/∂P = D + alpha·S·(D − c)/gamma
            D = tl.where(inside, D, 0.0)
            column_dot_tile = tl.load(column_dot + cols, mask=cols < n, other=0.0)[None, :]
            d_logits = tl.where(inside, alpha * soft * (D - column_dot_tile), 0.0)
            tl.atomic_add(d_params, _total(D * soft), sem="relaxed")
            tl.atomic_add(d_params + 1, _total(D), sem="relaxed")
            tl.atomic_add(d_params + 2, -_total(d_logits * piecewise) / (gamma * gamma).to(tl.float64), sem="relaxed")
            D += div(d_logits, gamma)
    D = tl.where(inside, D, 0.0)
    if KERNEL == PIECEWISE or KERNEL == MIXTURE:
        for h in range(chunks):  # W_h = D·coeff[h]/r_h, ∂coeff[h] = Σ D·r_h
            squares = _chunk_sums(out_emb, in_emb, h, h + 1, rows, cols, m, n, width, False, D.dtype, BM, BN)
            radii = _sqrt(squares + scalar(eps, squares.dtype))
            tl.atomic_add(d_coeff + h, _total(D * radii), sem="relaxed")
            W = tl.where(inside, div(D * tl.load(coeff + h).to(D.dtype), radii), 0.0)
            _embedding_gradients(W, out_emb, in_emb, d_out, d_in, h, rows, cols, m, n, width, True, BP)
    elif KERNEL == RBF:  # W = D·(−2 alpha beta e), e = exp(−beta‖b − a‖²)
        squares = _chunk_sums(out_emb, in_emb, 0, chunks, rows, cols, m, n, width, False, D.dtype, BM, BN)
        bump = exp(-beta * squares)
        tl.atomic_add(d_params, _total(D * bump), sem="relaxed")
        tl.atomic_add(d_params + 1, -alpha * _total(D * squares * bump), sem="relaxed")
        tl.atomic_add(d_params + 2, _total(D), sem="relaxed")
        W = D * (-2.0 * alpha * beta) * bump
        for h in range(chunks):
            _embedding_gradients(W, out_emb, in_emb, d_out, d_in, h, rows, cols, m, n, width, True, BP)
    else:
        W = D
        if KERNEL == SIGMOID:  # ∂L/∂(b·a) = beta·D·alpha·σ(1 − σ)
            dots = _chunk_sums(out_emb, in_emb, 0, chunks, rows, cols, m, n, width, True, D.dtype, BM, BN)
            sig = div(tl.full((), 1.0, dots.dtype), 1.0 + exp(-beta * dots))
            pre = D * alpha * sig * (1.0 - sig)
            tl.atomic_add(d_params, _total(D * sig), sem="relaxed")
            tl.atomic_add(d_params + 1, _total(pre * dots), sem="relaxed")
            tl.atomic_add(d_params + 2, _total(D), sem="relaxed")
            W = tl.where(inside, beta * pre, 0.0)  # the padding's inf·0 must not reach the dot products
        for h in range(chunks):
            _embedding_gradients(W, out_emb, in_emb, d_out, d_in, h, rows, cols, m, n, width, False, BP)


def _column_stats(problem: KernelProblem):
    """Mixture's softmax statistics per column: (M_i = max_j P_ji, Σ_j exp((P_ji − M_i)/gamma))."""
    out_emb, in_emb, _, coeff, params, eps, _ = problem
    chunks, m, width = out_emb.shape
    n = in_emb.shape[1]
    column_max, column_sum = params.new_empty(n), params.new_empty(n)
    launch(columns_kernel, (triton.cdiv(n, BLOCK_N),),
        out_emb, out_emb, in_emb, coeff, params, params, column_max, column_sum, column_sum,
        m, n, chunks, width, eps, MODE=0, DOT=False, BM=BLOCK_M, BN=BLOCK_N,
    )  # fmt: skip
    return column_max, column_sum


@register("kernelized_sparse_delta", "triton")
def kernelized_sparse_delta(problem: KernelProblem, k, tau=None):
    """[ΔW, τ]: κ(Out, In) in out_emb's dtype, sparsified when ``problem.mode`` is given (None: the
    dense op, τ = −inf), by ``tau`` or else by the k-th smallest magnitude. κ is computed
    in params' dtype (the compute dtype), where τ is selected and the mask applied: a half
    ΔW is κ rounded once (then masked into the result), not masked after a rounding."""
    out_emb, in_emb, kernel, coeff, params, eps, mode = problem
    chunks, m, width = out_emb.shape
    n = in_emb.shape[1]
    out = out_emb.new_empty(m, n)
    if out.numel() == 0:
        return [out, params.new_full((), float("-inf")) if tau is None else tau]
    raw = out if mode is None or out.dtype == params.dtype else params.new_empty(m, n)  # κ, before the mask
    stats = _column_stats(problem) if kernel == "mixture" else (raw, raw)
    selecting = mode is not None and tau is None and k > 0
    counted = _new_counts(raw) if selecting else None  # filled by delta_kernel
    launch(delta_kernel, tile_grid(m, n, BLOCK_M, BLOCK_N),
        raw, out_emb, in_emb, coeff, params, *stats, raw if counted is None else counted, _shifts(raw.dtype)[0],
        m, n, chunks, width, eps, KERNEL=kernel_id(kernel), COUNT=counted is not None,
        DOUBLE=params.dtype == torch.float64, BINS=BINS, BM=BLOCK_M, BN=BLOCK_N,
    )  # fmt: skip
    if mode is None:
        return [out, params.new_full((), float("-inf"))]
    if tau is None:
        tau = _kth_smallest_magnitude(raw, k, counted)
    return [_mask(out, raw, raw, tau, mode, backward=False), tau]


def _in_dtypes_of(gradients, inputs) -> list[torch.Tensor]:
    """Each gradient rounded once into its input's dtype."""
    return [gradient.to(input.dtype) for gradient, input in zip(gradients, inputs)]


@register("kernelized_sparse_delta_backward", "triton")
def kernelized_sparse_delta_backward(grad, problem: KernelProblem, tau):
    out_emb, in_emb, kernel, coeff, params, eps, mode = problem
    check_deterministic("kernelized_delta_backward" if mode is None else "kernelized_sparse_delta_backward", "triton")
    chunks, m, width = out_emb.shape
    n = in_emb.shape[1]
    d_out = torch.zeros_like(out_emb, dtype=params.dtype)  # atomic sums in the compute dtype
    d_in = torch.zeros_like(in_emb, dtype=params.dtype)
    d_coeff = torch.zeros_like(coeff, dtype=torch.float64)  # sums over m·n entries
    d_params = torch.zeros_like(params, dtype=torch.float64)
    if m * n == 0:
        return _in_dtypes_of((d_out, d_in, d_coeff, d_params), (out_emb, in_emb, coeff, params))
    tau = grad if tau is None else tau
    column_max = column_sum = column_dot = grad
    if kernel == "mixture":
        column_max, column_sum = _column_stats(problem)
        column_dot = params.new_empty(n)
        launch(columns_kernel, (triton.cdiv(n, BLOCK_N),),
            grad, out_emb, in_emb, coeff, params, tau, column_max, column_sum, column_dot,
            m, n, chunks, width, eps, MODE=mode_id(mode), DOT=True, BM=BLOCK_M, BN=BLOCK_N,
        )  # fmt: skip
    launch(backward_kernel, tile_grid(m, n, BLOCK_M, BLOCK_N),
        grad, out_emb, in_emb, coeff, params, tau, column_max, column_sum, column_dot,
        d_out, d_in, d_coeff, d_params, m, n, chunks, width, eps,
        KERNEL=kernel_id(kernel), MODE=mode_id(mode), BM=BLOCK_M, BN=BLOCK_N,
        BP=max(16, triton.next_power_of_2(width)), num_warps=8,
    )  # fmt: skip
    return _in_dtypes_of((d_out, d_in, d_coeff, d_params), (out_emb, in_emb, coeff, params))


@register("sparse_linear_backward", "triton")
def sparse_linear_backward(*args):
    return sparse_linear_backward_from_dense(kernelized_sparse_delta, kernelized_sparse_delta_backward, *args)
