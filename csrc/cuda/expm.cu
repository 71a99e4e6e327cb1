#include "expm.h"
#include "launch.h"
#include "tensor_peft/expm.h"

namespace tensor_peft::cuda {
namespace {

constexpr int kThreads = 128;

// The n×n matrices a thread keeps past expm's workspace: X (forward); X, E and exp(X).
constexpr int kForwardCopies = 1, kBackwardCopies = 3;

template <typename T, int N>
__global__ void forward_kernel(const T* A, T* out, int64_t batch, int n, T* work, int* pivots) {
    const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (b >= batch) return;
    const int64_t nn = static_cast<int64_t>(n) * n;
    T* scratch = work + b * (expm::workspace_size(n) + kForwardCopies * nn);
    T* X = scratch + expm::workspace_size(n);  // A, scaled in place
    for (int64_t i = 0; i < nn; ++i) X[i] = A[b * nn + i];
    expm::exp_and_frechet<T, N>(X, nullptr, out + b * nn, nullptr, n, scratch, pivots + b * n);
}

template <typename T, int N>
__global__ void backward_kernel(const T* grad, const T* A, T* dA, int64_t batch, int n, T* work, int* pivots) {
    const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (b >= batch) return;
    const int64_t nn = static_cast<int64_t>(n) * n;
    T* scratch = work + b * (expm::workspace_size(n) + kBackwardCopies * nn);
    T* X = scratch + expm::workspace_size(n);  // Aᵀ
    T* E = X + nn;                              // c·Γ
    T* exp_X = E + nn;
    const T* g = grad + b * nn;
    const T* a = A + b * nn;
    const int shift = expm::gradient_shift(g, n);
    const T down = ldexp(T(1), -shift), up = ldexp(T(1), shift);  // powers of two: exact
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) {
            X[i * n + j] = a[j * n + i];
            E[i * n + j] = down * g[i * n + j];
        }
    T* d = dA + b * nn;
    expm::exp_and_frechet<T, N>(X, E, exp_X, d, n, scratch, pivots + b * n);
    for (int64_t i = 0; i < nn; ++i) d[i] *= up;
}

unsigned blocks(int64_t batch) {
    return static_cast<unsigned>((batch + kThreads - 1) / kThreads);
}

template <int N>
struct Forward {
    template <typename T>
    static void run(const T* A, T* out, int64_t batch, int n, T* work, int* pivots, cudaStream_t stream) {
        launch("matrix_exp_forward", forward_kernel<T, N>, blocks(batch), kThreads, 0, stream, A, out, batch, n, work,
               pivots);
    }
};

template <int N>
struct Backward {
    template <typename T>
    static void run(const T* grad, const T* A, T* dA, int64_t batch, int n, T* work, int* pivots, cudaStream_t stream) {
        launch("matrix_exp_backward", backward_kernel<T, N>, blocks(batch), kThreads, 0, stream, grad, A, dA, batch, n,
               work, pivots);
    }
};

}  // namespace

int64_t matrix_exp_workspace(int64_t n, bool backward) {
    return expm::workspace_size(n) + (backward ? kBackwardCopies : kForwardCopies) * n * n;
}

template <typename T>
void matrix_exp_forward(const T* A, T* out, int64_t batch, int n, T* work, int* pivots, std::uintptr_t stream) {
    if (batch == 0) return;
    expm::with_size<Forward>(n, A, out, batch, n, work, pivots, reinterpret_cast<cudaStream_t>(stream));
}

template <typename T>
void matrix_exp_backward(const T* grad, const T* A, T* dA, int64_t batch, int n, T* work, int* pivots,
                         std::uintptr_t stream) {
    if (batch == 0) return;
    expm::with_size<Backward>(n, grad, A, dA, batch, n, work, pivots, reinterpret_cast<cudaStream_t>(stream));
}

template void matrix_exp_forward<float>(const float*, float*, int64_t, int, float*, int*, std::uintptr_t);
template void matrix_exp_forward<double>(const double*, double*, int64_t, int, double*, int*, std::uintptr_t);
template void matrix_exp_backward<float>(const float*, const float*, float*, int64_t, int, float*, int*,
                                         std::uintptr_t);
template void matrix_exp_backward<double>(const double*, const double*, double*, int64_t, int, double*, int*,
                                          std::uintptr_t);

}  // namespace tensor_peft::cuda
