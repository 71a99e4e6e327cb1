// Launchers of the CUDA kernels for updates ΔW = scale·U·R on a weight's (d0, n) matrix
// view, U (d0, r0) and R (r0, n) thin, with the epilogues of tensor_peft/lowrank.h.
// Backward reads Γ once: D = Γ (add), Γ ⊙ W0 ⊙ exp(ΔW) recomputed (exp) or Γ ⊙ W0, and
// dU += scale·D·Rᵀ, dR += scale·Uᵀ·D. Callable from the g++-compiled binding: no CUDA
// types here, the stream travels as an integer (torch's cuda_stream).
// Dtypes: the large tensors (out, W0, Γ) are stored as S, U, R, dU, dR and the arithmetic
// are in the compute type T: S = T (float, double), or S = BFloat16 / Float16 with
// T = float (half.h: each entry widened exactly, each result rounded once).
#pragma once

#include <cstdint>

namespace tensor_peft::cuda {

template <typename S, typename T>
void lowrank_forward(S* out, const S* weight, const T* U, const T* R, int64_t d0, int64_t r0, int64_t n, T scale,
                     int epilogue, std::uintptr_t stream);

template <typename S, typename T>
void lowrank_backward(const S* grad, const S* weight, const T* U, const T* R, T* dU, T* dR, int64_t d0, int64_t r0,
                      int64_t n, T scale, int epilogue, std::uintptr_t stream);

}  // namespace tensor_peft::cuda
