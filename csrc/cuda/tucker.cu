#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "tucker.h"

namespace tensor_peft::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerTile = 16;  // rows of Γ one backward block reads (fewer atomics into dR)
constexpr int64_t kMaxGridY = 65535;

// One block: kThreads columns of rows blockIdx.y, blockIdx.y + gridDim.y, …; the row
// of U0 (times scale) sits in shared memory.
template <typename T>
__global__ void forward_kernel(T* out, const T* weight, const T* U0, const T* R, int64_t d0, int64_t r0, int64_t n,
                               T scale) {
    extern __shared__ unsigned char shared[];
    T* u = reinterpret_cast<T*>(shared);
    const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    for (int64_t i0 = blockIdx.y; i0 < d0; i0 += gridDim.y) {
        __syncthreads();
        for (int64_t a = threadIdx.x; a < r0; a += blockDim.x) u[a] = scale * U0[i0 * r0 + a];
        __syncthreads();
        if (j < n) {
            T acc = weight ? weight[i0 * n + j] : T(0);
            for (int64_t a = 0; a < r0; ++a) acc += u[a] * R[a * n + j];
            out[i0 * n + j] = acc;
        }
    }
}

// One block: a tile of kRowsPerTile rows × kThreads columns of Γ, read once. Each thread
// adds its column's share of dR; each warp sums its 32 columns' share of dU0 by shuffles.
template <typename T>
__global__ void backward_kernel(const T* grad, const T* U0, const T* R, T* dU0, T* dR, int64_t d0, int64_t r0,
                                int64_t n, T scale) {
    const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    const bool column_in = j < n;
    const int64_t row0 = blockIdx.y * static_cast<int64_t>(kRowsPerTile);
    T g[kRowsPerTile];
#pragma unroll
    for (int t = 0; t < kRowsPerTile; ++t) g[t] = (column_in && row0 + t < d0) ? grad[(row0 + t) * n + j] : T(0);
    for (int64_t a = 0; a < r0; ++a) {
        const T r = column_in ? R[a * n + j] : T(0);
        T dr = 0;
#pragma unroll
        for (int t = 0; t < kRowsPerTile; ++t) {
            const int64_t i = row0 + t;
            dr += (i < d0 ? U0[i * r0 + a] : T(0)) * g[t];
            T partial = g[t] * r;
            for (int offset = 16; offset > 0; offset >>= 1) partial += __shfl_down_sync(0xffffffffu, partial, offset);
            if ((threadIdx.x & 31) == 0 && i < d0) atomicAdd(&dU0[i * r0 + a], scale * partial);
        }
        if (column_in) atomicAdd(&dR[a * n + j], scale * dr);
    }
}

void check_launch(const char* name) {
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) throw std::runtime_error(std::string(name) + ": " + cudaGetErrorString(status));
}

}  // namespace

template <typename T>
void tucker_forward(T* out, const T* weight, const T* U0, const T* R, int64_t d0, int64_t r0, int64_t n, T scale,
                    std::uintptr_t stream) {
    const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads), static_cast<unsigned>(std::min(d0, kMaxGridY)));
    forward_kernel<T><<<grid, kThreads, r0 * sizeof(T), reinterpret_cast<cudaStream_t>(stream)>>>(out, weight, U0, R,
                                                                                                   d0, r0, n, scale);
    check_launch("tucker_forward");
}

template <typename T>
void tucker_backward(const T* grad, const T* U0, const T* R, T* dU0, T* dR, int64_t d0, int64_t r0, int64_t n,
                     T scale, std::uintptr_t stream) {
    const int64_t tiles = (d0 + kRowsPerTile - 1) / kRowsPerTile;
    if (tiles > kMaxGridY) throw std::invalid_argument("tucker_backward: more than 65535·16 output channels");
    const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads), static_cast<unsigned>(tiles));
    backward_kernel<T><<<grid, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(grad, U0, R, dU0, dR, d0, r0,
                                                                                      n, scale);
    check_launch("tucker_backward");
}

template void tucker_forward<float>(float*, const float*, const float*, const float*, int64_t, int64_t, int64_t,
                                    float, std::uintptr_t);
template void tucker_forward<double>(double*, const double*, const double*, const double*, int64_t, int64_t, int64_t,
                                     double, std::uintptr_t);
template void tucker_backward<float>(const float*, const float*, const float*, float*, float*, int64_t, int64_t,
                                     int64_t, float, std::uintptr_t);
template void tucker_backward<double>(const double*, const double*, const double*, double*, double*, int64_t,
                                      int64_t, int64_t, double, std::uintptr_t);

}  // namespace tensor_peft::cuda
