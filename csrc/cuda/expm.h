// Launchers of the CUDA matrix exponential (LieRA's matrix groups), callable from the
// g++-compiled binding; the stream travels as an integer. One thread per matrix runs the
// shared math of tensor_peft/expm.h in the data's precision, in its own slice of a
// workspace the caller allocates: matrix_exp_workspace(n, backward) values and n ints of
// pivots per matrix.
//   forward   out[b] = exp(A[b])
//   backward  dA[b] = L(A[b]ᵀ, Γ[b]), Γ scaled by a power of two to ‖Γ‖₁ ≤ 1 and back.
#pragma once

#include <cstdint>

namespace tensor_peft::cuda {

// The values of workspace one n×n matrix takes in the forward (false) or backward (true).
int64_t matrix_exp_workspace(int64_t n, bool backward);

template <typename T>
void matrix_exp_forward(const T* A, T* out, int64_t batch, int n, T* work, int* pivots, std::uintptr_t stream);

template <typename T>
void matrix_exp_backward(const T* grad, const T* A, T* dA, int64_t batch, int n, T* work, int* pivots,
                         std::uintptr_t stream);

}  // namespace tensor_peft::cuda
