"""Triton kernels for the Tucker ops (FLoRA), after the split of ``tucker_split``:
ΔW = s·U_0·R on the weight's matrix view (d0, n).

- ``merge_kernel``: one (BM × BN) tile of W0 + s·U_0·R (or ΔW) per program, the rank
  dimension r0 in BK-wide steps: one read of W0, one write of the result.
- ``backward_kernel``: one tile of Γ per program, read once, giving that tile's share of
  dU_0 = s·Γ·Rᵀ and dR = s·U_0ᵀ·Γ, summed into them with atomic adds.
Written for the interpreter too (``TRITON_INTERPRET=1``): no libdevice, plain masked loads,
IEEE-precision dots (no TF32)."""

from __future__ import annotations

import triton
import triton.language as tl

from ..tucker_split import tucker_ops

BLOCK_M, BLOCK_N = 32, 64


@triton.jit
def merge_kernel(out, weight, U0, R, d0, r0, n, scale, HAS_WEIGHT: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=out.dtype.element_ty)
    for k0 in range(0, r0, BK):
        ks = k0 + tl.arange(0, BK)
        u = tl.load(U0 + rows[:, None] * r0 + ks[None, :], mask=(rows[:, None] < d0) & (ks[None, :] < r0), other=0.0)
        r = tl.load(R + ks[:, None] * n + cols[None, :], mask=(ks[:, None] < r0) & (cols[None, :] < n), other=0.0)
        acc += tl.dot(u, r, input_precision="ieee")
    acc = acc * scale
    inside = (rows[:, None] < d0) & (cols[None, :] < n)
    offsets = rows[:, None] * n + cols[None, :]
    if HAS_WEIGHT:
        acc += tl.load(weight + offsets, mask=inside, other=0.0)
    tl.store(out + offsets, acc, mask=inside)


@triton.jit
def backward_kernel(grad, U0, R, dU0, dR, d0, r0, n, scale,
                    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):  # fmt: skip
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    cols = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    ks = tl.arange(0, BR)
    row_in, col_in, rank_in = rows < d0, cols < n, ks < r0
    g = tl.load(grad + rows[:, None] * n + cols[None, :], mask=row_in[:, None] & col_in[None, :], other=0.0)
    r = tl.load(R + ks[:, None] * n + cols[None, :], mask=rank_in[:, None] & col_in[None, :], other=0.0)
    u = tl.load(U0 + rows[:, None] * r0 + ks[None, :], mask=row_in[:, None] & rank_in[None, :], other=0.0)
    d_u0 = tl.dot(g, tl.trans(r), input_precision="ieee") * scale
    tl.atomic_add(dU0 + rows[:, None] * r0 + ks[None, :], d_u0, mask=row_in[:, None] & rank_in[None, :])
    d_r = tl.dot(tl.trans(u), g, input_precision="ieee") * scale
    tl.atomic_add(dR + ks[:, None] * n + cols[None, :], d_r, mask=rank_in[:, None] & col_in[None, :])


def _launch_forward(out, weight, U0, R, d0, r0, n, scale):
    grid = (triton.cdiv(d0, BLOCK_M), triton.cdiv(n, BLOCK_N))
    merge_kernel[grid](
        out, out if weight is None else weight, U0, R, d0, r0, n, scale,
        HAS_WEIGHT=weight is not None, BM=BLOCK_M, BN=BLOCK_N, BK=16,
    )  # fmt: skip


def _launch_backward(grad, U0, R, d_U0, d_R, d0, r0, n, scale):
    grid = (triton.cdiv(d0, BLOCK_M), triton.cdiv(n, BLOCK_N))
    rank_block = max(16, triton.next_power_of_2(r0))
    backward_kernel[grid](grad, U0, R, d_U0, d_R, d0, r0, n, scale, BM=BLOCK_M, BN=BLOCK_N, BR=rank_block)


tucker_delta, tucker_merge, tucker_delta_backward = tucker_ops(_launch_forward, _launch_backward)
