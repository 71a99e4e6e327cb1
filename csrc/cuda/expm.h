// Launchers of the CUDA matrix exponential (LieRA's matrix groups), callable from the
// g++-compiled binding; the stream travels as an integer. A team of threads runs each
// matrix through the shared math of tensor_peft/expm.h in the data's precision, the
// matrix products split over its threads: part of a warp or a warp for n ≤ 16 (several
// matrices per block), a block for larger n. The workspace lies in shared memory, or,
// when a matrix's does not fit there, in a global workspace the caller allocates:
// matrix_exp_workspace<T>(n, backward) values per matrix (0 when on chip).
//   forward   out[b] = exp(A[b])
//   backward  dA[b] = L(A[b]ᵀ, Γ[b]), Γ scaled by a power of two to ‖Γ‖₁ ≤ 1 and back.
#pragma once

#include <cstdint>

namespace tensor_peft::cuda {

// The values of global workspace one n×n matrix takes on the current device in the
// forward (false) or backward (true): 0 when its workspace fits in shared memory.
template <typename T>
int64_t matrix_exp_workspace(int64_t n, bool backward);

template <typename T>
void matrix_exp_forward(const T* A, T* out, int64_t batch, int n, T* work, std::uintptr_t stream);

template <typename T>
void matrix_exp_backward(const T* grad, const T* A, T* dA, int64_t batch, int n, T* work, std::uintptr_t stream);

}  // namespace tensor_peft::cuda
