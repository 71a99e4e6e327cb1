"""The ``reference`` backend: every op in plain torch, with explicit backward formulas.

This is the executable form of SPEC §2 and the oracle the other backends are tested
against, so it is written for clarity, not speed. Calling convention (the op layer in
``tensor_peft.ops`` checks and prepares the inputs): tensors are contiguous, of one
dtype (float32 or float64) and on one device; results come back in that dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEVICE_TYPES = ("cpu", "cuda")

# Row blocks of the kernelized ops keep the (rows, n, p) difference tensor at most this big.
_BLOCK_ELEMENTS = 1 << 24


def unavailable_reason(device_type: str) -> str | None:
    return None


# --------------------------------------------------------------------------- Tucker


def unfold(tensor: Tensor, mode: int) -> Tensor:
    """Mode-k unfolding X_(k): mode k becomes the rows, the other modes (in order) the columns."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def mode_product(tensor: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """T ×_k M: contract mode k of T (size r) with the columns of M (d, r); mode k becomes d."""
    return torch.tensordot(tensor, matrix, dims=([mode], [1])).movedim(-1, mode)


def tucker_delta(core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    """ΔW = s · G ×_0 U_0 ×_1 U_1 … ×_{N-1} U_{N-1}."""
    delta = core
    for mode, factor in enumerate(factors):
        delta = mode_product(delta, factor, mode)
    return scale * delta


def tucker_merge(weight: Tensor, core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    return weight + tucker_delta(core, factors, scale)


def tucker_delta_backward(
    grad: Tensor, core: Tensor, factors: list[Tensor], scale: float
) -> list[Tensor]:
    """[∂L/∂G, ∂L/∂U_0, …]: ∂L/∂G = s · Γ ×_0 U_0ᵀ ×_1 U_1ᵀ …, and
    ∂L/∂U_k = s · Γ_(k) · [(G ×_{j≠k} U_j)_(k)]ᵀ."""
    d_core = grad
    for mode, factor in enumerate(factors):
        d_core = mode_product(d_core, factor.T, mode)
    d_factors = []
    for k in range(len(factors)):
        partial = core
        for mode, factor in enumerate(factors):
            if mode != k:
                partial = mode_product(partial, factor, mode)
        d_factors.append(scale * unfold(grad, k) @ unfold(partial, k).T)
    return [scale * d_core, *d_factors]


# --------------------------------------------------------------------------- matrix exponential


# Padé [13/13] coefficients and the 1-norm up to which it is accurate to double precision
# (Higham, "The scaling and squaring method for the matrix exponential revisited", 2005).
_PADE13 = (64764752532480000.0, 32382376266240000.0, 7771770303897600.0, 1187353796428800.0,
           129060195264000.0, 10559470521600.0, 670442572800.0, 33522128640.0, 1323241920.0,
           40840800.0, 960960.0, 16380.0, 182.0, 1.0)  # fmt: skip
_THETA13 = 5.371920351148152


def matrix_exp(A: Tensor) -> Tensor:
    """exp(A) by scaling and squaring with the Padé [13/13] approximant, each matrix scaled
    by its own power of two. (``torch.linalg.matrix_exp`` picks its Taylor degree from the
    largest norm in a batch and can lose accuracy on a lone small matrix.) Non-finite
    entries give NaN."""
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


def matrix_exp_backward(grad: Tensor, A: Tensor) -> Tensor:
    """∂L/∂A = L(Aᴴ, Γ), the adjoint Fréchet derivative, read off the upper-right block of
    exp([[Aᴴ, Γ], [0, Aᴴ]]) = [[exp(Aᴴ), L(Aᴴ, Γ)], [0, exp(Aᴴ)]]."""
    n = A.shape[-1]
    adjoint = A.mH
    block = torch.cat(
        [torch.cat([adjoint, grad], dim=-1), torch.cat([torch.zeros_like(A), adjoint], dim=-1)],
        dim=-2,
    )
    return matrix_exp(block)[..., :n, n:].contiguous()


# --------------------------------------------------------------------------- kernelized (SNELL)


def _concat_chunks(emb: Tensor) -> Tensor:
    """(H, rows, p) -> (rows, H·p): the full vectors b_j or a_i."""
    chunks, rows, width = emb.shape
    return emb.permute(1, 0, 2).reshape(rows, chunks * width)


def _split_chunks(full: Tensor, chunks: int) -> Tensor:
    """(rows, H·p) -> (H, rows, p), the inverse of ``_concat_chunks``."""
    rows = full.shape[0]
    return full.reshape(rows, chunks, -1).permute(1, 0, 2).contiguous()


def squared_distances(rows: Tensor, cols: Tensor) -> Tensor:
    """‖rows[j] − cols[i]‖² for all (j, i), from direct differences (exact near 0),
    a block of rows at a time to bound the temporary."""
    block = max(1, _BLOCK_ELEMENTS // max(1, cols.numel()))
    out = rows.new_empty(rows.shape[0], cols.shape[0])
    for start in range(0, rows.shape[0], block):
        diff = rows[start : start + block, None, :] - cols[None, :, :]
        out[start : start + block] = diff.square().sum(-1)
    return out


def _piecewise_radii(out_emb: Tensor, in_emb: Tensor, eps: float) -> Tensor:
    """r_h[j, i] = sqrt(‖b_j^(h) − a_i^(h)‖² + eps), shape (H, m, n)."""
    return torch.stack(
        [squared_distances(b, a) for b, a in zip(out_emb, in_emb)]
    ).add(eps).sqrt()


def _weighted_distance_grads(weights: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of Σ_{j,i} W[j,i]·‖rows_j − cols_i‖²/2 w.r.t. rows and cols:
    rowsum(W)_j rows_j − (W cols)_j and colsum(W)_i cols_i − (Wᵀ rows)_i."""
    d_rows = weights.sum(1, keepdim=True) * rows - weights @ cols
    d_cols = weights.sum(0)[:, None] * cols - weights.T @ rows
    return d_rows, d_cols


def kernelized_delta(
    out_emb: Tensor, in_emb: Tensor, kernel: str, coeff: Tensor, params: Tensor, eps: float
) -> Tensor:
    """ΔW_raw[j, i] = κ(b_j, a_i) for the kernel named ``kernel`` (see ``ops.kernelized_delta``)."""
    alpha, beta, gamma = params
    if kernel in ("piecewise_linear", "mixture"):
        delta = torch.einsum("h,hji->ji", coeff, _piecewise_radii(out_emb, in_emb, eps))
        if kernel == "mixture":
            delta = delta + alpha * torch.softmax(delta / gamma, dim=0) + beta
        return delta
    b, a = _concat_chunks(out_emb), _concat_chunks(in_emb)
    if kernel == "rbf":
        return alpha * torch.exp(-beta * squared_distances(b, a)) + gamma
    if kernel == "sigmoid":
        return alpha * torch.sigmoid(beta * (b @ a.T)) + gamma
    if kernel == "linear":
        return b @ a.T
    raise ValueError(f"unknown kernel {kernel!r}")


def kernelized_delta_backward(
    grad: Tensor,
    out_emb: Tensor,
    in_emb: Tensor,
    kernel: str,
    coeff: Tensor,
    params: Tensor,
    eps: float,
) -> list[Tensor]:
    """[∂L/∂out_emb, ∂L/∂in_emb, ∂L/∂coeff, ∂L/∂params] for Γ = ``grad`` (m, n);
    zeros for the parameters the kernel does not use."""
    alpha, beta, gamma = params
    d_coeff, d_params = torch.zeros_like(coeff), torch.zeros_like(params)
    chunks = out_emb.shape[0]
    if kernel in ("piecewise_linear", "mixture"):
        radii = _piecewise_radii(out_emb, in_emb, eps)
        if kernel == "mixture":
            piecewise = torch.einsum("h,hji->ji", coeff, radii)
            soft = torch.softmax(piecewise / gamma, dim=0)
            # softmax Jacobian along j: ∂L/∂z = S ⊙ (g − Σ_j g ⊙ S), with g = alpha·Γ
            d_logits = soft * (alpha * grad - (alpha * grad * soft).sum(0, keepdim=True))
            d_params = torch.stack(
                [(grad * soft).sum(), grad.sum(), (d_logits * -piecewise / gamma**2).sum()]
            )
            grad = grad + d_logits / gamma  # ∂L/∂P
        # ∂r_h/∂b_j^(h) = (b_j^(h) − a_i^(h)) / r_h
        d_coeff = torch.einsum("ji,hji->h", grad, radii)
        d_pairs = [
            _weighted_distance_grads(grad * coeff[h] / radii[h], out_emb[h], in_emb[h])
            for h in range(chunks)
        ]
        return [
            torch.stack([d_b for d_b, _ in d_pairs]),
            torch.stack([d_a for _, d_a in d_pairs]),
            d_coeff,
            d_params,
        ]
    b, a = _concat_chunks(out_emb), _concat_chunks(in_emb)
    if kernel == "rbf":
        squared = squared_distances(b, a)
        bump = torch.exp(-beta * squared)
        d_params = torch.stack(
            [(grad * bump).sum(), (grad * alpha * bump * -squared).sum(), grad.sum()]
        )
        # ∂/∂b_j of exp(−β‖b_j − a_i‖²) = −2β exp(·)(b_j − a_i)
        d_b, d_a = _weighted_distance_grads(grad * -2 * alpha * beta * bump, b, a)
    elif kernel == "sigmoid":
        dots = b @ a.T
        sig = torch.sigmoid(beta * dots)
        slope = grad * alpha * sig * (1 - sig)
        d_params = torch.stack([(grad * sig).sum(), (slope * dots).sum(), grad.sum()])
        weights = slope * beta
        d_b, d_a = weights @ a, weights.T @ b
    elif kernel == "linear":
        d_b, d_a = grad @ a, grad.T @ b
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return [_split_chunks(d_b, chunks), _split_chunks(d_a, chunks), d_coeff, d_params]


# --------------------------------------------------------------------------- sparsification


def threshold(delta: Tensor, k: int) -> Tensor:
    """τ = the k-th smallest |ΔW| (1-indexed); −inf when k = 0 (keep all)."""
    if k == 0:
        return delta.new_tensor(-math.inf)
    return delta.abs().flatten().kthvalue(k).values


def _check_mode(mode: str) -> None:
    if mode not in ("hard", "soft"):
        raise ValueError(f"unknown mode {mode!r}")


def _sparsify_with(delta: Tensor, tau: Tensor, mode: str) -> Tensor:
    _check_mode(mode)
    magnitude = delta.abs()
    keep = magnitude > tau
    if mode == "hard":
        return delta * magnitude * keep
    return delta * (magnitude - tau.clamp_min(0)) * keep


def sparsify(delta: Tensor, k: int, mode: str) -> list[Tensor]:
    """[out, τ]: hard ΔW ⊙ |ΔW| ⊙ 1[|ΔW| > τ]; soft ΔW ⊙ max(|ΔW| − τ⁺, 0)."""
    tau = threshold(delta, k)
    return [_sparsify_with(delta, tau, mode), tau]


def sparsify_backward(grad: Tensor, delta: Tensor, tau: Tensor, mode: str) -> Tensor:
    """τ and, in hard mode, |ΔW| are stop-gradients: hard Γ ⊙ |ΔW| ⊙ mask,
    soft Γ ⊙ (2|ΔW| − τ⁺) ⊙ mask."""
    _check_mode(mode)
    magnitude = delta.abs()
    keep = magnitude > tau
    if mode == "hard":
        return grad * magnitude * keep
    return grad * (2 * magnitude - tau.clamp_min(0)) * keep


def kernelized_sparse_delta(
    out_emb: Tensor,
    in_emb: Tensor,
    k: int,
    kernel: str,
    coeff: Tensor,
    params: Tensor,
    eps: float,
    mode: str,
) -> list[Tensor]:
    return sparsify(kernelized_delta(out_emb, in_emb, kernel, coeff, params, eps), k, mode)


def kernelized_sparse_delta_backward(
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
    """Recomputes ΔW_raw from the parameters (nothing m×n was saved), rebuilds the mask
    from τ, then back through the kernel."""
    delta = kernelized_delta(out_emb, in_emb, kernel, coeff, params, eps)
    d_delta = sparsify_backward(grad, delta, tau, mode)
    return kernelized_delta_backward(d_delta, out_emb, in_emb, kernel, coeff, params, eps)


# --------------------------------------------------------------------------- LieRA merge


def _exp_form(exp: str):
    if exp == "exact":
        return torch.exp
    if exp == "taylor1":
        return lambda delta: 1 + delta
    raise ValueError(f"unknown exp {exp!r}")


def lowrank_hadamard_merge(weight: Tensor, B: Tensor, A: Tensor, scale: float, exp: str) -> Tensor:
    """W0 ⊙ exp(s·B·A) (exact) or W0 ⊙ (1 + s·B·A) (taylor1) on W0's matrix view."""
    delta = (scale * B @ A).reshape(weight.shape)
    return weight * _exp_form(exp)(delta)


def lowrank_hadamard_merge_backward(
    grad: Tensor, weight: Tensor, B: Tensor, A: Tensor, scale: float, exp: str
) -> list[Tensor]:
    """[∂L/∂B, ∂L/∂A] from ∂L/∂ΔW = Γ ⊙ W_eff (exact, recomputed) or Γ ⊙ W0 (taylor1)."""
    if exp == "exact":
        d_delta = grad * lowrank_hadamard_merge(weight, B, A, scale, exp)
    elif exp == "taylor1":
        d_delta = grad * weight
    else:
        raise ValueError(f"unknown exp {exp!r}")
    d_delta = d_delta.reshape(B.shape[0], A.shape[1])
    return [scale * d_delta @ A.T, scale * B.T @ d_delta]
