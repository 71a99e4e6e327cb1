"""The ``reference`` backend: every op in plain torch, with explicit backward formulas.

This is the executable form of the ops' definitions and the oracle the other backends are tested
against, so it is written for clarity, not speed. Calling convention (the op layer in
``tensor_peft.ops`` checks and prepares the inputs): tensors are contiguous, of one
dtype (float32 or float64) and on one device; results come back in that dtype. The
Tucker algebra (axis products, unfoldings) is ``tensor_algebra``, which the native
backends share.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import EXP_FORMS, KERNELS, MODES, check_choice
from .kernelized_ops import KernelProblem, sparse_linear_backward_from_dense
from .registry import register
from .tensor_algebra import masked, projected_tucker_gradients, tucker_gradients, tucker_product

DEVICE_TYPES = ("cpu", "cuda")

# Row blocks of the kernelized ops keep the (rows, n, p) difference tensor at most this big.
_BLOCK_ELEMENTS = 1 << 24


def unavailable_reason(device_type: str) -> str | None:
    """Why this backend cannot run on ``device_type`` tensors: never, it is plain torch."""
    return None


# --------------------------------------------------------------------------- Tucker


@register("tucker_delta", "reference")
def tucker_delta(core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    """ΔW = s · G ×_0 U_0 ×_1 U_1 … ×_{N-1} U_{N-1}."""
    return tucker_product(core, factors, scale)


@register("tucker_merge", "reference")
def tucker_merge(weight: Tensor, core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    """W0 + ΔW, in the weight's dtype (computed in the factors' dtype)."""
    delta = tucker_product(core, factors, scale)
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


@register("tucker_delta_backward", "reference")
def tucker_delta_backward(grad: Tensor, core: Tensor, factors: list[Tensor], scale: float) -> list[Tensor]:
    """[∂L/∂G, ∂L/∂U_0, …]: ∂L/∂G = s · Γ ×_0 U_0ᵀ ×_1 U_1ᵀ …, and
    ∂L/∂U_k = s · Γ_(k) · [(G ×_{j≠k} U_j)_(k)]ᵀ."""
    return tucker_gradients(grad, core, factors, scale)


@register("tucker_projected_backward", "reference")
def tucker_projected_backward(
    T0: Tensor, T1: Tensor, T01: Tensor, core: Tensor, factors: list[Tensor], scale: float
) -> list[Tensor]:
    """[∂L/∂G, ∂L/∂U_0, ∂L/∂U_1, …] from the projections T_0 = Γ ×_0 U_0ᵀ, T_1 = Γ ×_1 U_1ᵀ
    and T_01 = T_0 ×_1 U_1ᵀ of the weight gradient Γ (FLoRA's merged path)."""
    return projected_tucker_gradients(T0, T1, T01, core, factors, scale)


# --------------------------------------------------------------------------- matrix exponential


# Padé [13/13] coefficients and the 1-norm up to which it is accurate to double precision
# (Higham, "The scaling and squaring method for the matrix exponential revisited", 2005).
_PADE13 = (64764752532480000.0, 32382376266240000.0, 7771770303897600.0, 1187353796428800.0,
           129060195264000.0, 10559470521600.0, 670442572800.0, 33522128640.0, 1323241920.0,
           40840800.0, 960960.0, 16380.0, 182.0, 1.0)  # fmt: skip
_THETA13 = 5.371920351148152


@register("matrix_exp", "reference")
def matrix_exp(A: Tensor) -> Tensor:
    """exp(A) by scaling and squaring with the Padé [13/13] approximant, each matrix scaled
    by its own power of two (Higham 2005): to about one rounding in float64, where
    ``torch.linalg.matrix_exp`` is off by up to ~5e-11 relative, too coarse for an oracle.
    A matrix with a non-finite entry gives NaN."""
    if A.numel() == 0:
        return A.clone()
    norms = torch.linalg.matrix_norm(A, ord=1)
    finite = torch.isfinite(norms)
    squarings = torch.ceil(torch.log2(torch.where(finite, norms, 0.0) / _THETA13)).clamp(min=0)
    X = A / torch.exp2(squarings)[..., None, None]
    b = [c / _PADE13[0] for c in _PADE13]  # normalized, so that exp(0) is exactly I
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
    X2 = X @ X
    X4 = X2 @ X2
    X6 = X4 @ X2
    U = X @ (X6 @ (b[13] * X6 + b[11] * X4 + b[9] * X2) + b[7] * X6 + b[5] * X4 + b[3] * X2 + b[1] * eye)
    V = X6 @ (b[12] * X6 + b[10] * X4 + b[8] * X2) + b[6] * X6 + b[4] * X4 + b[2] * X2 + b[0] * eye
    result = torch.linalg.solve_ex(V - U, V + U).result
    for step in range(int(squarings.max())):
        result = torch.where((step < squarings)[..., None, None], result @ result, result)
    return torch.where(finite[..., None, None], result, torch.nan).contiguous()


@register("matrix_exp_backward", "reference")
def matrix_exp_backward(grad: Tensor, A: Tensor) -> Tensor:
    """∂L/∂A = L(Aᴴ, Γ), the adjoint Fréchet derivative, read off the upper-right block of
    exp([[Aᴴ, E], [0, Aᴴ]]) = [[exp(Aᴴ), L(Aᴴ, E)], [0, exp(Aᴴ)]]. L is linear in E, so a
    Γ with ‖Γ‖₁ > 1 is scaled by a power of two c to ‖E‖₁ ≤ 1, E = c·Γ, and the result
    divided by c (exactly): a large gradient then costs no extra squarings, nor their
    rounding."""
    n = A.shape[-1]
    grad_norms = torch.linalg.matrix_norm(grad, ord=1)
    c = torch.where(grad_norms > 1, torch.exp2(-torch.ceil(torch.log2(grad_norms))), 1.0)
    c = c[..., None, None]
    adjoint = A.mH
    block = torch.cat(
        [torch.cat([adjoint, c * grad], dim=-1), torch.cat([torch.zeros_like(A), adjoint], dim=-1)],
        dim=-2,
    )
    return matrix_exp(block)[..., :n, n:] / c


# --------------------------------------------------------------------------- kernelized (SNELL)

def _concat_chunks(emb: Tensor) -> Tensor:
    """(H, rows, p) -> (rows, H·p): the full vectors b_j or a_i."""
    chunks, rows, width = emb.shape
    return emb.permute(1, 0, 2).reshape(rows, chunks * width)


def _split_chunks(full: Tensor, chunks: int, width: int) -> Tensor:
    """(rows, H·p) -> (H, rows, p), the inverse of ``_concat_chunks``."""
    return full.reshape(full.shape[0], chunks, width).permute(1, 0, 2).contiguous()


def squared_distances(rows: Tensor, cols: Tensor) -> Tensor:
    """D[j, i] = ‖rows[j] − cols[i]‖² from direct differences (exact near 0), a block of
    rows at a time so that the (rows, n, p) temporary stays under ``_BLOCK_ELEMENTS``."""
    block = max(1, _BLOCK_ELEMENTS // max(1, cols.numel()))
    out = rows.new_empty(rows.shape[0], cols.shape[0])
    for start in range(0, rows.shape[0], block):
        diff = rows[start : start + block, None, :] - cols[None, :, :]
        out[start : start + block] = diff.square().sum(-1)
    return out


def _radii(b: Tensor, a: Tensor, eps: float) -> Tensor:
    """r[j, i] = sqrt(‖b_j − a_i‖² + eps) for one chunk: b (m, p), a (n, p)."""
    return squared_distances(b, a).add_(eps).sqrt_()


def _piecewise(out_emb: Tensor, in_emb: Tensor, coeff: Tensor, eps: float) -> Tensor:
    """P = Σ_h coeff[h]·r_h, one chunk at a time (never H m×n matrices at once)."""
    total = out_emb.new_zeros(out_emb.shape[1], in_emb.shape[1])
    return sum((c * _radii(b, a, eps) for c, b, a in zip(coeff, out_emb, in_emb)), total)


def _weighted_distance_grads(weights: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of Σ_{j,i} W[j,i]·‖rows_j − cols_i‖²/2 w.r.t. rows and cols:
    rowsum(W)_j rows_j − (W cols)_j and colsum(W)_i cols_i − (Wᵀ rows)_i."""
    d_rows = weights.sum(1, keepdim=True) * rows - weights @ cols
    d_cols = weights.sum(0)[:, None] * cols - weights.T @ rows
    return d_rows, d_cols


def kernelized_delta(problem: KernelProblem) -> Tensor:
    """ΔW_raw[j, i] = κ(b_j, a_i) (``problem.mode`` unused); (alpha, beta, gamma) = params, r_h as in ``_radii``:
    piecewise_linear P = Σ_h coeff[h]·r_h; rbf alpha·exp(−beta‖b_j − a_i‖²) + gamma;
    sigmoid alpha·σ(beta b_j·a_i) + gamma; linear b_j·a_i;
    mixture P + alpha·softmax_j(P/gamma) + beta, the softmax as ``_softmax``."""
    out_emb, in_emb, kernel, coeff, params, eps, _ = problem
    check_choice(kernel, "kernel", KERNELS)
    alpha, beta, gamma = params
    if kernel == "piecewise_linear":
        return _piecewise(out_emb, in_emb, coeff, eps)
    if kernel == "mixture":
        piecewise = _piecewise(out_emb, in_emb, coeff, eps)
        return piecewise + alpha * _softmax(piecewise, gamma) + beta
    b, a = _concat_chunks(out_emb), _concat_chunks(in_emb)
    if kernel == "rbf":
        return alpha * torch.exp(-beta * squared_distances(b, a)) + gamma
    if kernel == "sigmoid":
        return alpha * torch.sigmoid(beta * (b @ a.T)) + gamma
    return b @ a.T


def _softmax(piecewise: Tensor, gamma: Tensor) -> Tensor:
    """softmax_j(P/gamma) over each column, taken as softmax_j((P − max_j P)/gamma): the
    difference is formed before the division, so a small gamma magnifies only the rounding
    of P, not that of P/gamma (whose ulp, for P/gamma ~ 1e6 in float32, is 0.06)."""
    return torch.softmax((piecewise - piecewise.amax(0, keepdim=True)) / gamma, dim=0)


def _mixture_backward(grad: Tensor, piecewise: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """(∂L/∂P, ∂L/∂params) of K = P + alpha·S + beta, S = softmax_j(Z), Z = P/gamma:
    ∂L/∂Z = S ⊙ (alpha Γ − Σ_j alpha Γ ⊙ S) (softmax Jacobian along j),
    ∂L/∂P = Γ + ∂L/∂Z / gamma; ∂alpha = Σ Γ⊙S, ∂beta = Σ Γ, ∂gamma = Σ ∂L/∂Z ⊙ (−P/gamma²),
    with P − max_j P for P (each column of ∂L/∂Z sums to 0): no cancellation of large terms."""
    alpha, _, gamma = params
    soft = _softmax(piecewise, gamma)
    d_logits = alpha * soft * (grad - (grad * soft).sum(0, keepdim=True))
    shifted = piecewise - piecewise.amax(0, keepdim=True)
    d_gamma = (d_logits * -shifted).sum() / gamma**2
    d_params = torch.stack([(grad * soft).sum(), grad.sum(), d_gamma])
    return grad + d_logits / gamma, d_params


def kernelized_delta_backward(grad: Tensor, problem: KernelProblem) -> list[Tensor]:
    """[∂L/∂out_emb, ∂L/∂in_emb, ∂L/∂coeff, ∂L/∂params] for Γ = ``grad`` (m, n); zeros for
    the parameters the kernel function does not use. Piecewise, per chunk h (∂r_h/∂b_j = (b_j − a_i)/r_h):
    W_h = Γ ⊙ coeff[h] / r_h gives ∂b_j, ∂a_i by ``_weighted_distance_grads``,
    ∂coeff[h] = Σ Γ ⊙ r_h. rbf: W = Γ ⊙ (−2 alpha beta E), E = exp(−beta D);
    sigmoid: ∂(b_j·a_i) = Γ ⊙ alpha beta σ(1 − σ)."""
    out_emb, in_emb, kernel, coeff, params, eps, _ = problem
    check_choice(kernel, "kernel", KERNELS)
    alpha, beta, _ = params
    d_params = torch.zeros_like(params)
    if kernel in ("piecewise_linear", "mixture"):
        if kernel == "mixture":
            piecewise = _piecewise(out_emb, in_emb, coeff, eps)
            grad, d_params = _mixture_backward(grad, piecewise, params)
        d_out, d_in, d_coeff = torch.zeros_like(out_emb), torch.zeros_like(in_emb), torch.zeros_like(coeff)
        for h, (c, b, a) in enumerate(zip(coeff, out_emb, in_emb)):
            radii = _radii(b, a, eps)
            d_out[h], d_in[h] = _weighted_distance_grads(grad * c / radii, b, a)
            d_coeff[h] = (grad * radii).sum()
        return [d_out, d_in, d_coeff, d_params]
    b, a = _concat_chunks(out_emb), _concat_chunks(in_emb)
    if kernel == "rbf":
        squared = squared_distances(b, a)
        bump = torch.exp(-beta * squared)
        d_beta = -alpha * (grad * bump * squared).sum()
        d_params = torch.stack([(grad * bump).sum(), d_beta, grad.sum()])
        d_b, d_a = _weighted_distance_grads(grad * -2 * alpha * beta * bump, b, a)
    elif kernel == "sigmoid":
        dots = b @ a.T
        sig = torch.sigmoid(beta * dots)
        d_pre = grad * alpha * sig * (1 - sig)  # ∂L/∂(beta b_j·a_i)
        d_params = torch.stack([(grad * sig).sum(), (d_pre * dots).sum(), grad.sum()])
        d_b, d_a = beta * d_pre @ a, beta * d_pre.T @ b
    else:  # linear
        d_b, d_a = grad @ a, grad.T @ b
    chunks, _, width = out_emb.shape
    d_out, d_in = _split_chunks(d_b, chunks, width), _split_chunks(d_a, chunks, width)
    return [d_out, d_in, torch.zeros_like(coeff), d_params]


# --------------------------------------------------------------------------- sparsification

def threshold_value(delta: Tensor, k: int) -> Tensor:
    """τ = the k-th smallest |ΔW| over all entries (1-indexed; ``kthvalue`` works above
    2^24 entries, unlike ``torch.quantile``); −inf when k = 0 (keep all)."""
    if k == 0:
        return delta.new_tensor(-math.inf)
    return delta.abs().flatten().kthvalue(k).values


@register("sparsify", "reference")
def sparsify(delta: Tensor, k: int, mode: str) -> list[Tensor]:
    """[out, τ] with mask = 1[|ΔW| > τ] (ties at τ dropped) and τ⁺ = max(τ, 0):
    hard ΔW ⊙ |ΔW| ⊙ mask; soft ΔW ⊙ max(|ΔW| − τ⁺, 0) = ΔW ⊙ (|ΔW| − τ⁺) ⊙ mask."""
    tau = threshold_value(delta, k)
    return [masked(delta, tau, mode), tau]


@register("sparsify_backward", "reference")
def sparsify_backward(grad: Tensor, delta: Tensor, tau: Tensor, mode: str) -> Tensor:
    """τ and, in hard mode, |ΔW| are stop-gradients: hard Γ ⊙ |ΔW| ⊙ mask,
    soft Γ ⊙ (2|ΔW| − τ⁺) ⊙ mask."""
    check_choice(mode, "mode", MODES)
    magnitude = delta.abs()
    keep = magnitude > tau
    if mode == "hard":
        return grad * magnitude * keep
    return grad * (2 * magnitude - tau.clamp_min(0)) * keep


@register("kernelized_sparse_delta", "reference")
def kernelized_sparse_delta(problem: KernelProblem, k: int, tau: Tensor | None = None) -> list[Tensor]:
    """[out, τ] = sparsify(kernelized_delta(problem), k, problem.mode); with ``tau`` given,
    ΔW is masked by it instead (k unused). Mode None is the dense op: ΔW as it is (k = 0, τ = −inf)."""
    delta = kernelized_delta(problem)
    if tau is None:
        tau = threshold_value(delta, k)
    return [delta if problem.mode is None else masked(delta, tau, problem.mode), tau]


@register("kernelized_sparse_delta_backward", "reference")
def kernelized_sparse_delta_backward(grad: Tensor, problem: KernelProblem, tau: Tensor | None) -> list[Tensor]:
    """Recomputes ΔW_raw from the parameters (nothing m×n was saved), rebuilds the mask
    from the saved τ, then goes back through the kernel function (mode None: no mask, τ unused)."""
    if problem.mode is not None:
        grad = sparsify_backward(grad, kernelized_delta(problem), tau, problem.mode)
    return kernelized_delta_backward(grad, problem)


@register("sparse_linear_backward", "reference")
def sparse_linear_backward(*args):
    return sparse_linear_backward_from_dense(kernelized_sparse_delta, kernelized_sparse_delta_backward, *args)


# --------------------------------------------------------------------------- LieRA merge

@register("lowrank_hadamard_merge", "reference")
def lowrank_hadamard_merge(weight: Tensor, B: Tensor, A: Tensor, scale: float, exp: str) -> Tensor:
    """W0 ⊙ exp(D) (exact) or W0 ⊙ (1 + D) (taylor1), D = s·B·A reshaped to W0's shape."""
    check_choice(exp, "exp", EXP_FORMS)
    delta = (scale * B @ A).reshape(weight.shape)
    return weight * (torch.exp(delta) if exp == "exact" else 1 + delta)


@register("lowrank_hadamard_merge_backward", "reference")
def lowrank_hadamard_merge_backward(
    grad: Tensor, weight: Tensor, B: Tensor, A: Tensor, scale: float, exp: str
) -> list[Tensor]:
    """[∂L/∂B, ∂L/∂A] = [s·∂D·Aᵀ, s·Bᵀ·∂D] on the matrix view, from ∂L/∂D = Γ ⊙ W_eff
    (exact, W_eff recomputed) or Γ ⊙ W0 (taylor1). W0 gets no gradient."""
    check_choice(exp, "exp", EXP_FORMS)
    factor = lowrank_hadamard_merge(weight, B, A, scale, exp) if exp == "exact" else weight
    d_delta = (grad * factor).reshape(B.shape[0], A.shape[1])
    return [scale * d_delta @ A.T, scale * B.T @ d_delta]
