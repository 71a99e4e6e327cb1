// SNELL's kernel and mode numbers and the sparsification factor, shared by the CPU and
// CUDA kernels (the numbers are those of tensor_peft.backends.kernelized_ops.kernel_id/mode_id).
#pragma once

#include "tensor_peft/common.h"

namespace tensor_peft::kernelized {

enum Kernel : int { kPiecewise = 0, kRbf = 1, kSigmoid = 2, kLinear = 3, kMixture = 4 };
enum Mode : int { kNone = 0, kHard = 1, kSoft = 2 };

// The sparsification is out = x·factor with factor = |x| (hard) or |x| − τ⁺ (soft) where
// |x| > τ, else 0. backward: ∂out/∂x with τ and, hard, |x| held constant: |x| (hard) or
// 2|x| − τ⁺ (soft) where |x| > τ. A dropped entry's factor is the formula's value times 0,
// as in the reference's formula·mask: NaN where |x| or τ is NaN or infinite, so that a
// non-finite input is never turned into a zero gradient. τ⁺ = max(τ, 0) keeps a NaN τ.
template <typename T>
TP_INLINE T mask_factor(T x, T tau, int mode, bool backward) {
    const T magnitude = x < T(0) ? -x : x;
    const T tau_plus = tau < T(0) ? T(0) : tau;
    const T factor = mode == kHard ? magnitude : (backward ? T(2) * magnitude - tau_plus : magnitude - tau_plus);
    return magnitude > tau ? factor : factor * T(0);
}

}  // namespace tensor_peft::kernelized
