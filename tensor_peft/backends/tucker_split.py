"""What the native backends share for updates ΔW = s·U·R on a weight's matrix view:
``register_ops`` registers a backend's Tucker ops and LieRA's ``lowrank_hadamard_merge``,
the helpers here run on the backend's launchers of a forward kernel (with an epilogue:
add, exp, taylor1) and a backward kernel.

The Tucker split: every axis but the first is contracted
into the core, R = G ×_1 U_1 ×_2 U_2 … (r0 × the weight's other axes, never larger
than the weight since r0 ≤ d0), so that ΔW = s · U_0 · R on the matrix view. A kernel
then makes one pass over W0 (forward: W0 + s·U_0·R) or over Γ (backward: dU_0 = s·Γ·Rᵀ
and dR = s·U_0ᵀ·Γ); dG and the other dU_k are the (small) Tucker gradients of R.

Dtypes: the op layer passes tensors of one dtype (float32, float64) or, to a backend that
takes them, float16/bfloat16 tensors beside them. Everything is computed in the compute
dtype (the widest, at least float32): R, the kernels' accumulators and their float32
scratch gradients; a result comes back in its input's dtype, rounded once. The half
tensors the kernels read (W0, U_0, B, A, Γ) reach them as they are; the core and the
other factors, small, are cast for R."""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import register
from .tensor_algebra import compute_dtype, projected_tucker_gradients, tucker_gradients, tucker_product


def split_first_axis(core: Tensor, factors: list[Tensor]) -> tuple[Tensor, list[Tensor | None]]:
    """R (contiguous, shape (r0, d_1, …)) and the factors that give it from the core (None
    for axis 0, left as it is: no product with an identity, whose zeros would meet an
    infinite entry of the core as 0·inf = NaN)."""
    dtype = compute_dtype(core, *factors)
    factors_of_R = [None, *(factor.to(dtype) for factor in factors[1:])]
    return tucker_product(core.to(dtype), factors_of_R, 1.0).contiguous(), factors_of_R


def gradients(d_U0: Tensor, d_R: Tensor, core: Tensor, factors: list[Tensor],
              factors_of_R: list[Tensor | None]) -> list[Tensor]:  # fmt: skip
    """[dG, dU_0, dU_1, …] from the kernel's dU_0 and dR, each in its input's dtype."""
    d_core, _, *d_others = tucker_gradients(d_R, core.to(d_R.dtype), factors_of_R, 1.0)
    return [d.to(t.dtype) for d, t in zip([d_core, d_U0, *d_others], [core, *factors])]


def fused_forward(launch, weight: Tensor | None, core: Tensor, factors: list[Tensor], scale: float) -> Tensor:
    """W0 + ΔW in the weight's dtype (or ΔW, when ``weight`` is None, in the core's) by a
    backend's forward kernel, ``launch(out, weight, U0, R, d0, r0, n, scale)`` on the (d0,
    n) matrix views, which computes in R's dtype and rounds into ``out``'s once."""
    R, _ = split_first_axis(core, factors)
    d0, r0 = factors[0].shape
    out = R.new_empty([d0, *R.shape[1:]], dtype=(core if weight is None else weight).dtype)
    launch(out, weight, factors[0], R, d0, r0, R[0].numel(), scale)
    return out


def fused_backward(launch, grad: Tensor, core: Tensor, factors: list[Tensor], scale: float) -> list[Tensor]:
    """[dG, dU_0, …] by a backend's backward kernel, ``launch(grad, None, U0, R, dU0, dR, d0,
    r0, n, scale)`` (no weight: the add epilogue), which adds s·Γ·Rᵀ into dU0 and s·U_0ᵀ·Γ
    into dR (both start at zero)."""
    R, factors_of_R = split_first_axis(core, factors)
    d0, r0 = factors[0].shape
    d_U0, d_R = R.new_zeros(d0, r0), torch.zeros_like(R)
    launch(grad, None, factors[0], R, d_U0, d_R, d0, r0, R[0].numel(), scale)
    return gradients(d_U0, d_R, core, factors, factors_of_R)


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
    adds into dU and dR (both start at zero, in the compute dtype), each in its input's dtype."""
    dtype = compute_dtype(weight, B, A)
    d_B, d_A = torch.zeros_like(B, dtype=dtype), torch.zeros_like(A, dtype=dtype)
    launch(grad, weight, B, A, d_B, d_A, B.shape[0], B.shape[1], A[0].numel(), scale, exp)
    return [d_B.to(B.dtype), d_A.to(A.dtype)]


def projected_gradients(T0: Tensor, T1: Tensor, T01: Tensor, core: Tensor, factors: list[Tensor],
                        scale: float) -> list[Tensor]:  # fmt: skip
    """FLoRA's gradients from the projections (``projected_tucker_gradients``, small
    contractions in plain torch) in the compute dtype, each in its input's dtype."""
    inputs = [core, *factors]
    dtype = compute_dtype(T0, T1, T01, *inputs)
    T0, T1, T01, core, *factors = (t.to(dtype) for t in (T0, T1, T01, *inputs))
    d_inputs = projected_tucker_gradients(T0, T1, T01, core, factors, scale)
    return [d.to(t.dtype) for d, t in zip(d_inputs, inputs)]


def register_ops(backend: str, launch_forward, launch_backward) -> None:
    """Registers for ``backend`` the Tucker ops and ``lowrank_hadamard_merge``, forward and
    backward, by the helpers above on its launchers, and FLoRA's projected gradients (small
    contractions, no kernel of their own: plain torch)."""

    @register("tucker_delta", backend)
    def tucker_delta(core, factors, scale):
        return fused_forward(launch_forward, None, core, factors, scale)

    @register("tucker_merge", backend)
    def tucker_merge(weight, core, factors, scale):
        return fused_forward(launch_forward, weight, core, factors, scale)

    @register("tucker_delta_backward", backend)
    def tucker_delta_backward(grad, core, factors, scale):
        return fused_backward(launch_backward, grad, core, factors, scale)

    @register("lowrank_hadamard_merge", backend)
    def lowrank_hadamard_merge(weight, B, A, scale, exp):
        return hadamard_forward(launch_forward, weight, B, A, scale, exp)

    @register("lowrank_hadamard_merge_backward", backend)
    def lowrank_hadamard_merge_backward(grad, weight, B, A, scale, exp):
        return hadamard_backward(launch_backward, grad, weight, B, A, scale, exp)

    register("tucker_projected_backward", backend)(projected_gradients)
