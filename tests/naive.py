"""Naive formulations shared by the tests: the methods' formulas written directly, with
autograd for their gradients, independent of the code under test."""

from __future__ import annotations

import math

import torch

from tensor_peft.ops.sparsify import dropped_count


def naive_sparsify(delta: torch.Tensor, sparsity: float, mode: str) -> torch.Tensor:
    """SNELL's competition sparsification by a full sort, with τ (and |ΔW| in hard mode)
    detached: both are stop-gradients in the method."""
    k = dropped_count(sparsity, delta.numel())
    magnitude = delta.abs().detach()
    tau = magnitude.flatten().sort().values[k - 1] if k > 0 else delta.new_tensor(-math.inf)
    keep = magnitude > tau
    if mode == "hard":
        return delta * magnitude * keep
    return delta * torch.clamp(delta.abs() - tau.clamp_min(0), min=0) * keep
