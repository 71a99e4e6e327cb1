"""What the native backends share for updates ΔW = s·U·R on a weight's matrix view:
``register_ops`` registers a backend's Tucker ops and LieRA's ``lowrank_hadamard_merge``,
the helpers here run on the backend's launchers of a forward kernel (with an epilogue:
add, exp, taylor1) and a backward kernel.

The Tucker split: every mode but the first is contracted
into the core, R = G ×_1 U_1 ×_2 U_2 … (r0 × the weight's other modes, never larger
than the weight since r0 ≤ d0), so that ΔW = s · U_0 · R on the matrix view. A kernel
then makes one pass over W0 (forward: W0 + s·U_0·R) or over Γ (backward: dU_0 = s·Γ·Rᵀ
and dR = s·U_0ᵀ·Γ); dG and the other dU_k are the (small) Tucker gradients of R."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register
from .tensor_algebra import projected_tucker_gradients, tucker_gradients, tucker_product


def split_first_mode(core: Tensor, factors: list[Tensor]) -> tuple[Tensor, list[Tensor | None]]:
    """R (contiguous, shape (r0, d_1, …)) and the factors that give it from the core (None
    for mode 0, left as it is: no product with an identity, whose zeros would meet an
    infinite entry of the core as 0·inf = NaN)."""
    factors_of_R = [None, *factors[1:]]
    return tucker_product(core, factors_of_R, 1.0).contiguous(), factors_of_R


def gradients(d_U0: Tensor, d_R: Tensor, core: Tensor, factors_of_R: list[Tensor | None]) -> list[Tensor]:
    """[dG, dU_0, dU_1, …] from the kernel's dU_0 and dR."""
    d_core, _, *d_others = tucker_gradients(d_R, core, factors_of_R, 1.0)
    return [d_core, d_U0, *d_others]


def fused_forward(launch, weight: Tensor | None, core: Tensor, factors: list[Tensor], scale: float,
                  reads_half_weight: bool = False) -> Tensor:  # fmt: skip
    """W0 + ΔW (or ΔW when ``weight`` is None) in the weight's dtype by a backend's forward
    kernel, ``launch(out, weight, U0, R, d0, r0, n, scale)`` on the (d0, n) matrix views.
    A float16/bfloat16 weight goes to the kernel as it is when it ``reads_half_weight``
    (and writes ``out`` in that dtype), else upcast to the factors' dtype around it."""
    R, _ = split_first_mode(core, factors)
    d0, r0 = factors[0].shape
    upcast = weight is not None and weight.dtype != R.dtype and not reads_half_weight
    source = weight.to(R.dtype) if upcast else weight
    out = R.new_empty([d0, *R.shape[1:]], dtype=R.dtype if source is None else source.dtype)
    launch(out, source, factors[0], R, d0, r0, R[0].numel(), scale)
    return out.to(weight.dtype) if upcast else out


def fused_backward(launch, grad: Tensor, core: Tensor, factors: list[Tensor], scale: float) -> list[Tensor]:
    """[dG, dU_0, …] by a backend's backward kernel, ``launch(grad, None, U0, R, dU0, dR, d0,
    r0, n, scale)`` (no weight: the add epilogue), which adds s·Γ·Rᵀ into dU0 and s·U_0ᵀ·Γ
    into dR (both start at zero)."""
    R, factors_of_R = split_first_mode(core, factors)
    d0, r0 = factors[0].shape
    d_U0, d_R = factors[0].new_zeros(d0, r0), torch.zeros_like(R)
    launch(grad, None, factors[0], R, d_U0, d_R, d0, r0, R[0].numel(), scale)
    return gradients(d_U0, d_R, core, factors_of_R)


def hadamard_forward(launch, weight: Tensor, B: Tensor, A: Tensor, scale: float, exp: str) -> Tensor:
    """LieRA's W0 ⊙ exp(s·B·A) (or the taylor1 form) with U = B, R = A on W0's (d0, n)
    view, by ``launch(out, weight, U, R, d0, r0, n, scale, epilogue)``."""
    out = torch.empty_like(weight)
    launch(out, weight, B, A, B.shape[0], B.shape[1], A[0].numel(), scale, exp)
    return out


def hadamard_backward(
    launch, grad: Tensor, weight: Tensor, B: Tensor, A: Tensor, scale: float, exp: str
) -> list[Tensor]:
    """[dB, dA] by ``launch(grad, weight, U, R, dU, dR, d0, r0, n, scale, epilogue)``, which
    adds into dU and dR (both start at zero)."""
    d_B, d_A = torch.zeros_like(B), torch.zeros_like(A)
    launch(grad, weight, B, A, d_B, d_A, B.shape[0], B.shape[1], A[0].numel(), scale, exp)
    return [d_B, d_A]


def register_ops(backend: str, launch_forward, launch_backward, reads_half_weight: bool = False) -> None:
    """Registers for ``backend`` the Tucker ops and ``lowrank_hadamard_merge``, forward and
    backward, by the helpers above on its launchers, and FLoRA's projected gradients (small
    contractions, no kernel of their own: plain torch)."""

    @register("tucker_delta", backend)
    def tucker_delta(core, factors, scale):
        return fused_forward(launch_forward, None, core, factors, scale)

    @register("tucker_merge", backend)
    def tucker_merge(weight, core, factors, scale):
        return fused_forward(launch_forward, weight, core, factors, scale, reads_half_weight)

    @register("tucker_delta_backward", backend)
    def tucker_delta_backward(grad, core, factors, scale):
        return fused_backward(launch_backward, grad, core, factors, scale)

    @register("lowrank_hadamard_merge", backend)
    def lowrank_hadamard_merge(weight, B, A, scale, exp):
        return hadamard_forward(launch_forward, weight, B, A, scale, exp)

    @register("lowrank_hadamard_merge_backward", backend)
    def lowrank_hadamard_merge_backward(grad, weight, B, A, scale, exp):
        return hadamard_backward(launch_backward, grad, weight, B, A, scale, exp)

    register("tucker_projected_backward", backend)(projected_tucker_gradients)
