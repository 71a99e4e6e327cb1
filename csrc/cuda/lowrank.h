// Launchers of the CUDA kernels for updates ΔW = scale·U·R on a weight's (d0, n) matrix
// view, U (d0, r0) and R (r0, n) thin, with the epilogue of the cpu row kernels:
//   0 add      out = W0 + ΔW (or ΔW alone when weight is null)   Tucker (FLoRA), U = U_0
//   1 exp      out = W0 ⊙ exp(ΔW)                               LieRA exact, U = B, R = A
//   2 taylor1  out = W0 ⊙ (1 + ΔW)                              LieRA taylor1
// Backward reads Γ once: D = Γ (add), Γ ⊙ W0 ⊙ exp(ΔW) recomputed (exp) or Γ ⊙ W0, and
// dU += scale·D·Rᵀ, dR += scale·Uᵀ·D. Callable from the g++-compiled binding: no CUDA
// types here, the stream travels as an integer (torch's cuda_stream).
#pragma once

#include <cstdint>

namespace tensor_peft::cuda {

template <typename T>
void lowrank_forward(T* out, const T* weight, const T* U, const T* R, int64_t d0, int64_t r0, int64_t n, T scale,
                     int epilogue, std::uintptr_t stream);

template <typename T>
void lowrank_backward(const T* grad, const T* weight, const T* U, const T* R, T* dU, T* dR, int64_t d0, int64_t r0,
                      int64_t n, T scale, int epilogue, std::uintptr_t stream);

}  // namespace tensor_peft::cuda
