"""``tucker_delta``: the FLoRA Tucker update ΔW = s · G ×_0 U_0 ×_1 U_1 … ×_{N-1} U_{N-1}.

Gradients (FLoRA's Tucker update): ∂L/∂G = s · Γ ×_0 U_0ᵀ ×_1 U_1ᵀ …,
∂L/∂U_k = s · Γ_(k) · [(G ×_{j≠k} U_j)_(k)]ᵀ, computed by the backend's
``tucker_delta_backward`` (also the backward of ``tucker_merge``); from projections of Γ
by ``tucker_projected_backward``.

A factor with no entries (some d_k = 0: ΔW is empty; some r_k = 0: ΔW is an empty sum,
zero) gives ΔW = 0 and zero gradients here, before any backend runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..backends.registry import run
from ..config import check_real
from ._common import check_same_device, check_tensor, custom_op, prepare, register_backward


def vanishes(factors: Sequence[Tensor]) -> bool:
    """ΔW is zero or empty: a factor has no entries (some d_k or r_k is 0)."""
    return any(factor.numel() == 0 for factor in factors)


def _fake_gradients(*args) -> list[Tensor]:
    """A fake's [∂G, ∂U_0, …] for arguments that end with (core, factors, scale)."""
    core, factors = args[-3], args[-2]
    return [torch.empty_like(core)] + [torch.empty_like(factor) for factor in factors]


@custom_op("tucker_delta", fake=lambda core, factors, scale: core.new_empty([factor.shape[0] for factor in factors]))
def _tucker_delta(core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    if vanishes(factors):
        return core.new_zeros([factor.shape[0] for factor in factors])
    return run("tucker_delta", core.device, core, factors, scale)


@custom_op("tucker_delta_backward", fake=_fake_gradients)
def tucker_delta_backward(
    grad: Tensor, core: Tensor, factors: list[Tensor], scale: float
) -> list[Tensor]:
    """[∂L/∂G, ∂L/∂U_0, …] from Γ = ``grad`` (shape of ΔW)."""
    if vanishes(factors):
        return [torch.zeros_like(core)] + [torch.zeros_like(factor) for factor in factors]
    return run("tucker_delta_backward", core.device, grad, core, factors, scale)


@custom_op("tucker_projected_backward", fake=_fake_gradients)
def _tucker_projected_backward(
    T0: Tensor, T1: Tensor, T01: Tensor, core: Tensor, factors: list[Tensor], scale: float
) -> list[Tensor]:
    if vanishes(factors):
        return [torch.zeros_like(core)] + [torch.zeros_like(factor) for factor in factors]
    return run("tucker_projected_backward", core.device, T0, T1, T01, core, factors, scale)


def tucker_projected_backward(
    T0: Tensor, T1: Tensor, T01: Tensor, core: Tensor, factors: Sequence[Tensor], scale: float
) -> list[Tensor]:
    """[∂L/∂G, ∂L/∂U_0, ∂L/∂U_1, …] of ``tucker_delta`` from projections of the weight
    gradient Γ, which need not exist: T0 = Γ ×_0 U_0ᵀ, T1 = Γ ×_1 U_1ᵀ, T01 = T0 ×_1 U_1ᵀ
    (FLoRA's merged path, whose layer computes them from its input and output gradient).
    Each gradient comes back in its own input's dtype."""
    T0, T1, T01, computed_core, *computed_factors = prepare(
        "tucker_projected_backward", T0, T1, T01, core, *factors
    )
    d_core, *d_factors = _tucker_projected_backward(T0, T1, T01, computed_core, computed_factors, scale)
    return [d_core.to(core.dtype), *(d.to(f.dtype) for d, f in zip(d_factors, factors))]


def save_tucker_inputs(ctx, inputs, output) -> None:
    """The setup of the autograd of an op whose inputs end with (core, factors, scale)."""
    *_, core, factors, scale = inputs
    ctx.save_for_backward(core, *factors)
    ctx.scale = scale


def tucker_grads(ctx, grad: Tensor) -> tuple[Tensor, list[Tensor]]:
    core, *factors = ctx.saved_tensors
    d_core, *d_factors = tucker_delta_backward(grad.to(core.dtype).contiguous(), core, factors, ctx.scale)
    return d_core, d_factors


def _backward(ctx, grad):
    d_core, d_factors = tucker_grads(ctx, grad)
    return d_core, d_factors, None


register_backward(_tucker_delta, "tucker_delta", save_tucker_inputs, _backward)


def check_tucker(core: object, factors: object, scale: object) -> tuple[Tensor, list[Tensor], float]:
    """Validated (core, factors, scale): ``len(factors) == core.dim() >= 2`` and
    ``factors[k]`` of shape ``(d_k, core.shape[k])``."""
    core = check_tensor(core, "core", min_ndim=2)
    if not isinstance(factors, Sequence) or isinstance(factors, Tensor):
        raise TypeError(f"factors must be a list of tensors, got {type(factors).__name__}")
    if len(factors) != core.dim():
        raise ValueError(
            f"factors must hold one matrix per mode of core ({core.dim()}), got {len(factors)}"
        )
    factors = [check_tensor(f, f"factors[{k}]", ndim=2) for k, f in enumerate(factors)]
    for k, factor in enumerate(factors):
        if factor.shape[1] != core.shape[k]:
            raise ValueError(
                f"factors[{k}] must have shape (d_{k}, {core.shape[k]}) to match core.shape[{k}], "
                f"got {tuple(factor.shape)}"
            )
    check_same_device({"core": core, **{f"factors[{k}]": f for k, f in enumerate(factors)}})
    return core, factors, check_real(scale, "scale")


def tucker_delta(core: Tensor, factors: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    """ΔW = scale · core ×_0 factors[0] ×_1 factors[1] … (any N ≥ 2).

    core: ``(r_0, …, r_{N-1})``; factors[k]: ``(d_k, r_k)``; returns ``(d_0, …, d_{N-1})``
    in core's dtype (computed in at least float32)."""
    core, factors, scale = check_tucker(core, factors, scale)
    computed_core, *factors = prepare("tucker_delta", core, *factors)
    return _tucker_delta(computed_core, factors, scale).to(core.dtype)
