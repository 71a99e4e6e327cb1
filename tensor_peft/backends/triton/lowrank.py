"""Triton kernels for updates ΔW = s·U·R on a weight's matrix view (d0, n), U and R thin,
with an epilogue per method (as the cpu backend's row kernels):
  add (0)      W0 + ΔW, or ΔW alone       the Tucker ops after the split of ``tucker_split``
  exp (1)      W0 ⊙ exp(ΔW)               LieRA's ``lowrank_hadamard_merge`` (U = B, R = A)
  taylor1 (2)  W0 ⊙ (1 + ΔW)

- ``merge_kernel``: one (BM × BN) tile of the result per program, the rank dimension in
  BK-wide steps: one read of W0, one write of the result.
- ``backward_kernel``: one tile of Γ per program, read once, D = ∂L/∂ΔW from it (Γ; Γ ⊙
  W0 ⊙ exp(ΔW) with the tile of ΔW recomputed; Γ ⊙ W0), and that tile's share of
  dU = s·D·Rᵀ and dR = s·Uᵀ·D, BK ranks at a time (registers do not grow with the
  rank), summed into them with atomic adds (float atomics: the summation order, and so
  the last bits of dU and dR, vary between runs).
Float16/bfloat16 tensors are read and written as they are (``shared``'s dtypes).
Written for the interpreter too (``TRITON_INTERPRET=1``): plain masked loads, exp by
``shared.exp``, IEEE-precision dots (no TF32), the scale passed as float64."""

from __future__ import annotations

import triton
import triton.language as tl

from .. import tucker_split
from ..determinism import check_deterministic
from .shared import compute_type, exp, launch, rounded, scalar, tile, tile_grid

BLOCK_M, BLOCK_N = 32, 64
# r0 stays a loop bound for every rank: Triton would make r0 = 1 a constant and unroll the
# loop over the rank, a compile of its own that spills registers (float64 backward, sm_90).
rank_jit = triton.jit(do_not_specialize=["r0"])


EPILOGUE = {"add": 0, "exact": 1, "taylor1": 2}


@rank_jit
def merge_kernel(out, weight, U0, R, d0, r0, n, scale: tl.float64, HAS_WEIGHT: tl.constexpr, EPILOGUE: tl.constexpr,
                 COMPUTE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    rows, cols = tile(d0, n, BM, BN)
    acc = tl.zeros((BM, BN), dtype=COMPUTE)
    for k0 in range(0, r0, BK):
        ks = k0 + tl.arange(0, BK)
        u = tl.load(U0 + rows[:, None] * r0 + ks[None, :], mask=(rows[:, None] < d0) & (ks[None, :] < r0), other=0.0)
        r = tl.load(R + ks[:, None] * n + cols[None, :], mask=(ks[:, None] < r0) & (cols[None, :] < n), other=0.0)
        acc += tl.dot(u.to(COMPUTE), r.to(COMPUTE), input_precision="ieee")
    acc = acc * scalar(scale, acc.dtype)
    inside = (rows[:, None] < d0) & (cols[None, :] < n)
    offsets = rows[:, None] * n + cols[None, :]
    if HAS_WEIGHT:
        w = tl.load(weight + offsets, mask=inside, other=0.0).to(acc.dtype)
        if EPILOGUE == 0:
            acc = w + acc
        elif EPILOGUE == 1:
            acc = w * exp(acc)
        else:
            acc = w * (1.0 + acc)
    tl.store(out + offsets, rounded(acc, out.dtype.element_ty), mask=inside)


@rank_jit
def backward_kernel(grad, weight, U0, R, dU0, dR, d0, r0, n, scale: tl.float64, EPILOGUE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """Adds into dU0 and dR, which hold the compute dtype."""
    rows, cols = tile(d0, n, BM, BN)
    row_in, col_in = rows < d0, cols < n
    inside = row_in[:, None] & col_in[None, :]
    COMPUTE: tl.constexpr = dU0.dtype.element_ty
    g = tl.load(grad + rows[:, None] * n + cols[None, :], mask=inside, other=0.0).to(COMPUTE)
    s = scalar(scale, COMPUTE)
    if EPILOGUE != 0:  # D = Γ ⊙ W0 ⊙ exp(ΔW) (exact) or Γ ⊙ W0 (taylor1)
        g = g * tl.load(weight + rows[:, None] * n + cols[None, :], mask=inside, other=0.0).to(COMPUTE)
        if EPILOGUE == 1:
            delta = tl.zeros((BM, BN), dtype=g.dtype)
            for k0 in range(0, r0, BK):
                ks = k0 + tl.arange(0, BK)
                u = tl.load(U0 + rows[:, None] * r0 + ks[None, :], mask=row_in[:, None] & (ks[None, :] < r0), other=0.0)
                r = tl.load(R + ks[:, None] * n + cols[None, :], mask=(ks[:, None] < r0) & col_in[None, :], other=0.0)
                delta += tl.dot(u.to(COMPUTE), r.to(COMPUTE), input_precision="ieee")
            g = g * exp(delta * s)
    for k0 in range(0, r0, BK):
        ks = k0 + tl.arange(0, BK)
        u_in, r_in = row_in[:, None] & (ks[None, :] < r0), (ks[:, None] < r0) & col_in[None, :]
        u = tl.load(U0 + rows[:, None] * r0 + ks[None, :], mask=u_in, other=0.0).to(COMPUTE)
        r = tl.load(R + ks[:, None] * n + cols[None, :], mask=r_in, other=0.0).to(COMPUTE)
        tl.atomic_add(dU0 + rows[:, None] * r0 + ks[None, :], tl.dot(g, tl.trans(r), input_precision="ieee") * s,
                      mask=u_in, sem="relaxed")  # fmt: skip
        tl.atomic_add(dR + ks[:, None] * n + cols[None, :], tl.dot(tl.trans(u), g, input_precision="ieee") * s,
                      mask=r_in, sem="relaxed")  # fmt: skip


def _launch_forward(out, weight, U0, R, d0, r0, n, scale, epilogue="add"):
    grid = tile_grid(d0, n, BLOCK_M, BLOCK_N)
    launch(merge_kernel, grid,
        out, out if weight is None else weight, U0, R, d0, r0, n, scale,
        HAS_WEIGHT=weight is not None, EPILOGUE=EPILOGUE[epilogue], COMPUTE=compute_type(weight, U0, R),
        BM=BLOCK_M, BN=BLOCK_N, BK=16,
    )  # fmt: skip


def _launch_backward(grad, weight, U0, R, d_U0, d_R, d0, r0, n, scale, epilogue="add"):
    """Adds s·D·Rᵀ into d_U0 and s·U0ᵀ·D into d_R (both must start at zero, in the compute dtype)."""
    check_deterministic("tucker_delta_backward" if epilogue == "add" else "lowrank_hadamard_merge_backward", "triton")
    grid = tile_grid(d0, n, BLOCK_M, BLOCK_N)
    launch(backward_kernel, grid,
        grad, grad if weight is None else weight, U0, R, d_U0, d_R, d0, r0, n, scale,
        EPILOGUE=EPILOGUE[epilogue], BM=BLOCK_M, BN=BLOCK_N, BK=16,
    )  # fmt: skip


tucker_split.register_ops("triton", _launch_forward, _launch_backward)
