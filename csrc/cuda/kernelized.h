// Launchers of the CUDA kernels for SNELL (the math of csrc/cpu/kernelized*), callable
// from the g++-compiled binding: no CUDA types here, the stream travels as an integer.
//   forward   out (m, n) = κ(Out, In), sparsified when mode is 1 (hard) or 2 (soft)
//             with τ = the k-th smallest |κ| by radix select on the float bits, the bin
//             of each pass found on the device (τ is written to device memory, never
//             read back); k = 0 keeps everything and leaves τ to the caller.
//   backward  the gradients of the embeddings and kernel parameters from Γ, κ recomputed
//             tile by tile, nothing m×n read but Γ.
// Every pointer is device memory, the kernel parameters (alpha, beta, gamma) included.
// Dtypes: ΔW, Γ and sparsify's tensors are stored as S; the embeddings, kernel parameters,
// τ, the gradient sums and every computation are in the compute type T: S = T (float,
// double), or S = BFloat16 / Float16 with T = float (half.h: widened exactly on load,
// rounded once on store). τ is selected on the T values of |κ| or |x|.
#pragma once

#include <cstdint>

namespace tensor_peft::cuda {

template <typename T>
struct Kernelized {
    const T* out_emb;  // (H, m, p)
    const T* in_t;     // (H, p, n): In transposed, so that a warp reads 32 columns at once
    int64_t m, n, chunks, width;
    int kernel;        // tensor_peft/kernelized.h's Kernel
    const T* coeff;    // (H,)
    const T* params;   // (alpha, beta, gamma)
    T eps;
    T* columns;        // columns_workspace values (mixture: softmax max, sum, and Σ_j D·S)
};

// Values of `columns` the kernel takes for n columns.
int64_t columns_workspace(int64_t n, int kernel);

// int64 values of workspace the radix select needs for a float32 (false) or float64 matrix.
int64_t select_workspace(bool is_double);

// raw (m, n) holds κ in T before the mask rounds it into out (mode 1/2; it may be out
// when S = T); unread without sparsification.
template <typename S, typename T>
void kernelized_forward(const Kernelized<T>& problem, S* out, T* raw, int64_t k, int mode, T* tau,
                        int64_t* select_work, std::uintptr_t stream);

// d_out_emb (H, m, p) and d_in_t (H, p, n) are added into (start them at zero); d_coeff (H)
// and d_params (3) are float64 sums, also added into. tau: null without sparsification.
template <typename S, typename T>
void kernelized_backward(const Kernelized<T>& problem, const S* grad, const T* tau, int mode, T* d_out_emb,
                         T* d_in_t, double* d_coeff, double* d_params, std::uintptr_t stream);

template <typename S, typename T>
void sparsify(const S* x, S* out, int64_t count, int64_t k, int mode, T* tau, int64_t* select_work,
              std::uintptr_t stream);

template <typename S, typename T>
void sparsify_backward(const S* grad, const S* x, S* d_x, int64_t count, const T* tau, int mode,
                       std::uintptr_t stream);

}  // namespace tensor_peft::cuda
