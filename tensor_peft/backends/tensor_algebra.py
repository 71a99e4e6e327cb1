"""Tensor algebra in plain torch, shared by the backends and the ops: axis-k unfoldings and
products, the Tucker product and its gradients, FLoRA's gradients from projected weight
gradients, and SNELL's mask by a known threshold. No kernels and no backend selection
here: every backend may call it; the dtype the ops compute in too.

A factor ``None`` stands for the identity: its axis is left as it is (no product with an
identity matrix, whose zeros would meet an infinite entry as 0·inf = NaN)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import MODES, check_choice


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The widest dtype among ``tensors``, at least float32."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def unfold(tensor: Tensor, axis: int) -> Tensor:
    """Axis-k unfolding X_(k): axis k becomes the rows, the other axes (in order) the columns."""
    rest = math.prod([size for k, size in enumerate(tensor.shape) if k != axis])  # a list: torch.compile traces it
    return tensor.movedim(axis, 0).reshape(tensor.shape[axis], rest)


def axis_product(tensor: Tensor, matrix: Tensor, axis: int) -> Tensor:
    """T ×_k M (the mode-k product of the literature): contract axis k of T (size r) with
    the columns of M (d, r); axis k becomes d."""
    return torch.tensordot(tensor, matrix, dims=([axis], [1])).movedim(-1, axis)


def tucker_product(core: Tensor, factors: list[Tensor | None], scale: float) -> Tensor:
    """s · G ×_0 U_0 ×_1 U_1 … ×_{N-1} U_{N-1}."""
    delta = core
    for axis, factor in enumerate(factors):
        if factor is not None:
            delta = axis_product(delta, factor, axis)
    return scale * delta


def tucker_gradients(grad: Tensor, core: Tensor, factors: list[Tensor | None], scale: float) -> list[Tensor | None]:
    """[∂L/∂G, ∂L/∂U_0, …] of ``tucker_product`` for Γ = ``grad``: ∂L/∂G = s · Γ ×_0 U_0ᵀ
    ×_1 U_1ᵀ …, and ∂L/∂U_k = s · Γ_(k) · [(G ×_{j≠k} U_j)_(k)]ᵀ (None for a factor None)."""
    d_core = tucker_product(grad, [None if f is None else f.T for f in factors], scale)
    d_factors = []
    for k, factor in enumerate(factors):
        partial = tucker_product(core, [None if j == k else f for j, f in enumerate(factors)], scale)
        d_factors.append(None if factor is None else unfold(grad, k) @ unfold(partial, k).T)
    return [d_core, *d_factors]


def projected_tucker_gradients(
    T0: Tensor, T1: Tensor, T01: Tensor, core: Tensor, factors: list[Tensor], scale: float
) -> list[Tensor]:
    """[∂L/∂G, ∂L/∂U_0, ∂L/∂U_1, …] of ΔW = s · G ×_0 U_0 ×_1 U_1 … from projections of the
    weight gradient Γ, which itself is never needed: T_0 = Γ ×_0 U_0ᵀ, T_1 = Γ ×_1 U_1ᵀ and
    T_01 = T_0 ×_1 U_1ᵀ. ∂L/∂G and the spatial ∂L/∂U_k take T_01 (axes 0 and 1 already
    projected), ∂L/∂U_0 takes T_1 and ∂L/∂U_1 takes T_0."""
    U0, U1, *spatial = factors
    d_core, _, _, *d_spatial = tucker_gradients(T01, core, [None, None, *spatial], scale)
    d_U0 = tucker_gradients(T1, core, [U0, None, *spatial], scale)[1]
    d_U1 = tucker_gradients(T0, core, [None, U1, *spatial], scale)[2]
    return [d_core, d_U0, d_U1, *d_spatial]


def masked(delta: Tensor, tau: Tensor, mode: str) -> Tensor:
    """ΔW sparsified with the threshold τ: hard ΔW·|ΔW|·1[|ΔW| > τ], soft
    ΔW·(|ΔW| − τ⁺)·1[|ΔW| > τ]."""
    check_choice(mode, "mode", MODES)
    magnitude = delta.abs()
    keep = magnitude > tau
    if mode == "hard":
        return delta * magnitude * keep
    return delta * (magnitude - tau.clamp_min(0)) * keep
