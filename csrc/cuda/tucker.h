// Launchers of the CUDA Tucker kernels (FLoRA), callable from the g++-compiled binding:
// no CUDA types here, the stream travels as an integer (torch's cuda_stream).
// On the (d0, n) matrix views, with R = G ×_1 U_1 ×_2 U_2 … (r0, n):
//   forward   out = weight + scale · U0 · R (weight may be null: ΔW alone);
//   backward  dU0 += scale · Γ · Rᵀ and dR += scale · U0ᵀ · Γ, one read of Γ.
#pragma once

#include <cstdint>

namespace tensor_peft::cuda {

template <typename T>
void tucker_forward(T* out, const T* weight, const T* U0, const T* R, int64_t d0, int64_t r0, int64_t n, T scale,
                    std::uintptr_t stream);

template <typename T>
void tucker_backward(const T* grad, const T* U0, const T* R, T* dU0, T* dR, int64_t d0, int64_t r0, int64_t n,
                     T scale, std::uintptr_t stream);

}  // namespace tensor_peft::cuda
