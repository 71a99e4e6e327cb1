#include <algorithm>
#include <stdexcept>
#include <string>

#include "launch.h"
#include "lowrank.h"
#include "tensor_peft/lowrank.h"

namespace tensor_peft::cuda {
namespace {

using namespace tensor_peft::lowrank;  // Epilogue
constexpr int kThreads = 256;
constexpr int kRowsPerTile = 16;  // rows of Γ one backward block reads (fewer atomics into dR)

// One block: kThreads columns of rows blockIdx.y, blockIdx.y + gridDim.y, …; the row
// of U (times scale) sits in shared memory.
template <typename T>
__global__ void forward_kernel(T* out, const T* weight, const T* U, const T* R, int64_t d0, int64_t r0, int64_t n,
                               T scale, int epilogue) {
    TP_DYNAMIC_SHARED(T, u);
    const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    for (int64_t i0 = blockIdx.y; i0 < d0; i0 += gridDim.y) {
        __syncthreads();
        for (int64_t a = threadIdx.x; a < r0; a += blockDim.x) u[a] = scale * U[i0 * r0 + a];
        __syncthreads();
        if (j < n) {
            T delta = 0;
            for (int64_t a = 0; a < r0; ++a) delta += u[a] * R[a * n + j];
            const T w = weight ? weight[i0 * n + j] : T(0);
            out[i0 * n + j] = epilogue == kAdd ? w + delta : epilogue == kExp ? w * exp(delta) : w * (T(1) + delta);
        }
    }
}

// One block: a tile of kRowsPerTile rows × kThreads columns of Γ, read once and turned
// into D by the epilogue. Each thread adds its column's share of dR; each warp sums its
// 32 columns' share of dU by shuffles.
template <typename T>
__global__ void backward_kernel(const T* grad, const T* weight, const T* U, const T* R, T* dU, T* dR, int64_t d0,
                                int64_t r0, int64_t n, T scale, int epilogue) {
    const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    const bool column_in = j < n;
    const int64_t row0 = blockIdx.y * static_cast<int64_t>(kRowsPerTile);
    T g[kRowsPerTile];
#pragma unroll
    for (int t = 0; t < kRowsPerTile; ++t) {
        const int64_t i = row0 + t;
        const bool in = column_in && i < d0;
        g[t] = in ? grad[i * n + j] : T(0);
        if (in && epilogue != kAdd) {
            g[t] *= weight[i * n + j];
            if (epilogue == kExp) {
                T delta = 0;
                for (int64_t a = 0; a < r0; ++a) delta += U[i * r0 + a] * R[a * n + j];
                g[t] *= exp(scale * delta);
            }
        }
    }
    for (int64_t a = 0; a < r0; ++a) {
        const T r = column_in ? R[a * n + j] : T(0);
        T dr = 0;
#pragma unroll
        for (int t = 0; t < kRowsPerTile; ++t) {
            const int64_t i = row0 + t;
            dr += (i < d0 ? U[i * r0 + a] : T(0)) * g[t];
            T partial = g[t] * r;
            for (int offset = 16; offset > 0; offset >>= 1) partial += __shfl_down_sync(0xffffffffu, partial, offset);
            if ((threadIdx.x & 31) == 0 && i < d0) atomicAdd(&dU[i * r0 + a], scale * partial);
        }
        if (column_in) atomicAdd(&dR[a * n + j], scale * dr);
    }
}

// Above 48 KB a kernel's dynamic shared memory must be allowed explicitly, up to the
// device's opt-in limit (227 KB on sm_90, 163 KB on sm_80).
template <typename T>
void allow_shared_memory(const char* name, void (*kernel)(T*, const T*, const T*, const T*, int64_t, int64_t, int64_t,
                                                          T, int),
                         size_t bytes) {
    constexpr size_t kDefaultLimit = 48 * 1024;
    if (bytes <= kDefaultLimit) return;
    int device = 0, limit = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (bytes > static_cast<size_t>(limit))
        throw std::invalid_argument(std::string(name) + ": the rank needs " + std::to_string(bytes) +
                                    " bytes of shared memory per block, more than this GPU's " +
                                    std::to_string(limit));
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (status != cudaSuccess) throw std::runtime_error(std::string(name) + ": " + cudaGetErrorString(status));
}

}  // namespace

template <typename T>
void lowrank_forward(T* out, const T* weight, const T* U, const T* R, int64_t d0, int64_t r0, int64_t n, T scale,
                     int epilogue, std::uintptr_t stream) {
    const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads), static_cast<unsigned>(std::min(d0, kMaxGridY)));
    const size_t shared = static_cast<size_t>(r0) * sizeof(T);
    allow_shared_memory<T>("lowrank_forward", forward_kernel<T>, shared);
    launch("lowrank_forward", forward_kernel<T>, grid, kThreads, shared, reinterpret_cast<cudaStream_t>(stream), out,
           weight, U, R, d0, r0, n, scale, epilogue);
}

template <typename T>
void lowrank_backward(const T* grad, const T* weight, const T* U, const T* R, T* dU, T* dR, int64_t d0, int64_t r0,
                      int64_t n, T scale, int epilogue, std::uintptr_t stream) {
    const int64_t tiles = (d0 + kRowsPerTile - 1) / kRowsPerTile;
    if (tiles > kMaxGridY) throw std::invalid_argument("lowrank_backward: more than 65535·16 rows");
    const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads), static_cast<unsigned>(tiles));
    launch("lowrank_backward", backward_kernel<T>, grid, kThreads, 0, reinterpret_cast<cudaStream_t>(stream), grad,
           weight, U, R, dU, dR, d0, r0, n, scale, epilogue);
}

template void lowrank_forward<float>(float*, const float*, const float*, const float*, int64_t, int64_t, int64_t,
                                     float, int, std::uintptr_t);
template void lowrank_forward<double>(double*, const double*, const double*, const double*, int64_t, int64_t,
                                      int64_t, double, int, std::uintptr_t);
template void lowrank_backward<float>(const float*, const float*, const float*, const float*, float*, float*,
                                      int64_t, int64_t, int64_t, float, int, std::uintptr_t);
template void lowrank_backward<double>(const double*, const double*, const double*, const double*, double*, double*,
                                       int64_t, int64_t, int64_t, double, int, std::uintptr_t);

}  // namespace tensor_peft::cuda
