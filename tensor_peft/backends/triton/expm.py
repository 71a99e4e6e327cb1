"""``matrix_exp`` and its adjoint Fréchet backward on the triton backend.

n ≤ 32: a Triton kernel, one program per matrix, zero-padded to a power-of-two block
(16 ≤ B ≤ 32) held in registers, products by ``tl.dot``. Scaling and squaring with the
Taylor polynomial, which needs no linear solve: each matrix is scaled by its own power of
two 2^-s to ‖X‖₁ ≤ 1, Σ_{k≤m} X^k/k! is evaluated by Horner (m = 18 in float64, 10 in
float32: the first dropped term, 1/(m+1)!, is below the unit roundoff), and the result
squared s times. The Fréchet derivative L(X, E) runs the same recurrences on the pair
(X, E), the derivative of each step by the product rule. The Horner steps are a loop, not
unrolled, so that a kernel compiles in seconds. The padding stays zero (the identity is
masked to the n×n part), so it changes nothing.

32 < n ≤ 128: ``torch.linalg.matrix_exp`` (one batched call; L(X, E) as the upper right
block of exp([[X, E], [0, X]])). A whole 64×64 or 128×128 block per program does not fit
in registers (the kernel spilled and took minutes to compile); torch's batched products
run on the tensor cores' cuBLAS path instead.

A non-finite matrix gives NaN; the squarings are bounded by the exponent range.

Float16/bfloat16 matrices are computed in float32 and each result rounded once: the
kernel reads and writes them in their dtype; the torch path (n > 32) takes them upcast."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..registry import register
from .shared import div, launch, rounded

MAX_SIZE = 128
KERNEL_MAX_SIZE = 32  # one matrix per program, in registers
_ORDER = {torch.float32: 10, torch.float64: 18}


@triton.jit(do_not_specialize=["n"])  # one compile per B: n = 1 made a constant spills on sm_90
def expm_kernel(A, E, out, L, squarings, scales, E_scales, n,
                ORDER: tl.constexpr, B: tl.constexpr, DERIVATIVE: tl.constexpr):  # fmt: skip
    """exp(X) and L(X, E·e) / e (e: E_scales, a power of two per matrix) in scales' dtype,
    rounded once into out's and L's."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, B)
    cols = tl.arange(0, B)
    inside = (rows[:, None] < n) & (cols[None, :] < n)
    offsets = b * n * n + rows[:, None] * n + cols[None, :]
    scale = tl.load(scales + b)
    X = tl.load(A + offsets, mask=inside, other=0.0).to(scale.dtype) * scale
    eye = tl.where((rows[:, None] == cols[None, :]) & inside, 1.0, 0.0).to(X.dtype)
    P = eye
    dP = tl.zeros((B, B), dtype=X.dtype)
    dX = dP
    if DERIVATIVE:
        E_scale = tl.load(E_scales + b)
        dX = tl.load(E + offsets, mask=inside, other=0.0).to(scale.dtype) * (scale * E_scale)
    # Horner: P ← I + X·P/k for k = m … 1, and dP ← (dX·P + X·dP)/k with the P before the step
    for step in range(ORDER):
        k = tl.full((B, B), ORDER - step, X.dtype)
        if DERIVATIVE:
            dP = div(tl.dot(dX, P, input_precision="ieee") + tl.dot(X, dP, input_precision="ieee"), k)
        P = eye + div(tl.dot(X, P, input_precision="ieee"), k)
    for _ in range(tl.load(squarings + b)):  # (P, dP) ← (P·P, P·dP + dP·P)
        if DERIVATIVE:
            dP = tl.dot(P, dP, input_precision="ieee") + tl.dot(dP, P, input_precision="ieee")
        P = tl.dot(P, P, input_precision="ieee")
    tl.store(out + offsets, rounded(P, out.dtype.element_ty), mask=inside)
    if DERIVATIVE:
        tl.store(L + offsets, rounded(div(dP, tl.full((B, B), E_scale, dP.dtype)), L.dtype.element_ty), mask=inside)


def _by_torch(X: torch.Tensor, E: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """exp(X) and L(X, E) by ``torch.linalg.matrix_exp`` (the block form for L)."""
    if E is None:
        return torch.linalg.matrix_exp(X), None
    n = X.shape[-1]
    block = X.new_zeros(*X.shape[:-2], 2 * n, 2 * n)
    block[..., :n, :n] = X
    block[..., n:, n:] = X
    block[..., :n, n:] = E
    both = torch.linalg.matrix_exp(block)
    return both[..., :n, :n], both[..., :n, n:]


def _by_kernel(X, E, E_scales, finite, norms):
    out = torch.empty_like(X)
    L = None if E is None else torch.empty_like(E)
    squarings = torch.where(finite, torch.log2(norms).ceil().clamp_min(0), 0).to(torch.int32)
    scales = torch.ldexp(torch.ones_like(norms), -squarings)  # exact powers of two
    n = X.shape[-1]
    launch(expm_kernel, (norms.numel(),),
        X, X if E is None else E, out, out if L is None else L, squarings, scales,
        scales if E_scales is None else E_scales, n,
        ORDER=_ORDER[norms.dtype], B=max(16, triton.next_power_of_2(n)), DERIVATIVE=E is not None,
    )  # fmt: skip
    return out, L


def _one_norms(X: torch.Tensor) -> torch.Tensor:
    """‖X‖₁ of each matrix, in the compute dtype (float32 for a half X)."""
    return torch.linalg.vector_norm(X, 1, dim=-2, dtype=torch.promote_types(X.dtype, torch.float32)).amax(-1)


def _exp_and_frechet(X: torch.Tensor, E: torch.Tensor | None, E_shifts: torch.Tensor | None = None):
    """exp(X) and, when E is given, L(X, E), for a batch (..., n, n), in X's and E's dtypes
    (computed in float32 at least). E_shifts (int32, one per matrix): L is computed as
    L(X, E·2^-shift)·2^shift, the same by linearity, with fewer squarings' rounding."""
    n = X.shape[-1]
    if n > MAX_SIZE:
        raise ValueError(f"A: the triton backend's matrix_exp takes n ≤ {MAX_SIZE}, got n = {n}")
    if X.numel() == 0:
        return torch.empty_like(X), None if E is None else torch.empty_like(E)
    norms = _one_norms(X)
    finite = torch.isfinite(norms).reshape(-1)
    E_scales = None if E_shifts is None else torch.ldexp(torch.ones_like(norms), -E_shifts)
    if n <= KERNEL_MAX_SIZE:
        flat = None if E_scales is None else E_scales.reshape(-1)
        out, L = _by_kernel(X, E, flat, finite, norms.reshape(-1))
    else:
        zero = ~finite.reshape(X.shape[:-2])[..., None, None]  # no inf/NaN into torch's scaling
        scaled = None if E is None else (E.to(norms.dtype) * E_scales[..., None, None]).masked_fill(zero, 0)
        out, L = _by_torch(X.to(norms.dtype).masked_fill(zero, 0), scaled)
        out = out.to(X.dtype)
        L = None if L is None else (L / E_scales[..., None, None]).to(E.dtype)
    nan = ~finite.reshape(X.shape[:-2])[..., None, None]
    out.masked_fill_(nan, float("nan"))  # in place: no copy of the result
    return out, None if L is None else L.masked_fill_(nan, float("nan"))


@register("matrix_exp", "triton")
def matrix_exp(A: torch.Tensor) -> torch.Tensor:
    return _exp_and_frechet(A, None)[0]


@register("matrix_exp_backward", "triton")
def matrix_exp_backward(grad: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """L(Aᵀ, Γ), Γ scaled by a power of two to ‖Γ‖₁ ≤ 1 inside and the result scaled back."""
    grad_norms = _one_norms(grad)
    large = torch.isfinite(grad_norms) & (grad_norms > 1)
    shifts = torch.where(large, torch.log2(grad_norms).ceil(), 0).to(torch.int32)
    _, L = _exp_and_frechet(A.mT.contiguous(), grad, shifts)
    return L
