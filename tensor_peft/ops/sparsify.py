"""``sparsify``: SNELL's competition sparsification of a dense update.

With sparsity s, k = ceil(s·numel) entries are dropped: τ is the k-th smallest |ΔW|
(τ = −inf, keep all, when k = 0) and entries with |ΔW| > τ are kept (ties at τ are
dropped, so every backend keeps the same set). τ is a stop-gradient, as in the
released code where the threshold comes from detached magnitudes.

- ``hard`` (released code): ΔW ⊙ sg(|ΔW|) ⊙ 1[|ΔW| > τ]; ∂ = Γ ⊙ |ΔW| ⊙ mask.
- ``soft`` (paper eq. 5): ΔW ⊙ max(|ΔW| − τ⁺, 0), τ⁺ = max(τ, 0) (equal to the paper
  for k ≥ 1; keeps all as ΔW ⊙ |ΔW| for k = 0); ∂ = Γ ⊙ (2|ΔW| − τ⁺) ⊙ mask.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from ._common import check_choice, check_real, check_tensor, compute_dtype, forward_backend, prepare, record_backend, run

MODES = ("hard", "soft")


def dropped_count(sparsity: float, numel: int) -> int:
    """k = ceil(sparsity · numel), with sparsity read as the decimal it was written as
    (0.9 of 10 entries drops 9, not ceil(9.000000000000002) = 10)."""
    return math.ceil(Fraction(repr(float(sparsity))) * numel)


def check_sparsity(sparsity: object) -> float:
    sparsity = check_real(sparsity, "sparsity")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1] (the fraction of entries zeroed), got {sparsity}")
    return sparsity


@torch.library.custom_op("tensor_peft::sparsify", mutates_args=(), device_types=("cpu", "cuda"))
def _sparsify(delta: Tensor, sparsity: float, mode: str) -> tuple[Tensor, Tensor]:
    if delta.numel() == 0:  # nothing to drop: k = 0
        return torch.empty_like(delta), delta.new_full((), -math.inf)
    out, tau = run("sparsify", delta.device, delta, dropped_count(sparsity, delta.numel()), mode)
    return out, tau


@_sparsify.register_fake
def _(delta, sparsity, mode):
    return torch.empty_like(delta), delta.new_empty(())


@torch.library.custom_op(
    "tensor_peft::sparsify_backward", mutates_args=(), device_types=("cpu", "cuda")
)
def _sparsify_backward(grad: Tensor, delta: Tensor, tau: Tensor, mode: str) -> Tensor:
    if delta.numel() == 0:
        return torch.empty_like(delta)
    return run("sparsify_backward", delta.device, grad, delta, tau, mode)


@_sparsify_backward.register_fake
def _(grad, delta, tau, mode):
    return torch.empty_like(delta)


def _setup_context(ctx, inputs, output):
    delta, sparsity, mode = inputs
    _, tau = output
    ctx.mark_non_differentiable(tau)
    ctx.save_for_backward(delta, tau)
    ctx.mode = mode
    record_backend(ctx, "sparsify", delta.device)


def _backward(ctx, grad, grad_tau):
    delta, tau = ctx.saved_tensors
    with forward_backend(ctx):
        return _sparsify_backward(grad.contiguous(), delta, tau, ctx.mode), None, None


_sparsify.register_autograd(_backward, setup_context=_setup_context)


def sparsify(delta: Tensor, sparsity: float, mode: str = "hard") -> Tensor:
    """Keep the entries of ``delta`` that win the magnitude competition (see module doc).

    ``sparsity`` is the fraction of entries zeroed, in [0, 1]; returns delta's dtype."""
    delta = check_tensor(delta, "delta")
    sparsity = check_sparsity(sparsity)
    mode = check_choice(mode, "mode", MODES)
    out, _ = _sparsify(prepare(delta, compute_dtype(delta)), sparsity, mode)
    return out.to(delta.dtype)
