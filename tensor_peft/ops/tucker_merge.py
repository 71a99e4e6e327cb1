"""``tucker_merge``: W0 + ΔW with the Tucker update of ``tucker_delta``, in one pass.

The base weight is frozen and gets no gradient; G and U_k get the gradients of
``tucker_delta`` (Γ flows unchanged through the addition).

A float16/bfloat16 weight is merged in the compute dtype (at least float32) and the sum
rounded once into the weight's dtype; a backend that takes half tensors (triton) reads
and writes the weight once in its dtype, the others get it upcast (``_common.prepare``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..backends.registry import run
from ._common import check_frozen, check_same_device, check_tensor, custom_op, prepare, register_backward
from .tucker_delta import check_tucker, save_tucker_inputs, tucker_grads, vanishes


@custom_op("tucker_merge", fake=lambda weight, core, factors, scale: torch.empty_like(weight))
def _tucker_merge(weight: Tensor, core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    if vanishes(factors):
        return weight.clone()
    return run("tucker_merge", weight.device, weight, core, factors, scale)


def _backward(ctx, grad):
    d_core, d_factors = tucker_grads(ctx, grad)
    return None, d_core, d_factors, None


register_backward(_tucker_merge, "tucker_merge", save_tucker_inputs, _backward)


def tucker_merge(
    weight: Tensor, core: Tensor, factors: Sequence[Tensor], scale: float = 1.0
) -> Tensor:
    """``weight + tucker_delta(core, factors, scale)`` fused; the result has weight's dtype.

    ``weight.shape[k]`` must equal ``factors[k].shape[0]``; weight gets no gradient."""
    core, factors, scale = check_tucker(core, factors, scale)
    weight = check_tensor(weight, "weight", ndim=core.dim())
    expected = tuple(f.shape[0] for f in factors)
    if tuple(weight.shape) != expected:
        raise ValueError(
            f"weight must have the shape the factors give, {expected}, got {tuple(weight.shape)}"
        )
    check_same_device({"weight": weight, "core": core})
    check_frozen(weight)
    computed_weight, core, *factors = prepare("tucker_merge", weight, core, *factors)
    return _tucker_merge(computed_weight, core, factors, scale).to(weight.dtype)
