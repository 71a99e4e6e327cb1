#include <algorithm>
#include <stdexcept>
#include <string>

#include "half.h"
#include "launch.h"
#include "lowrank.h"
#include "tensor_peft/lowrank.h"

namespace tensor_peft::cuda {
namespace {

using namespace tensor_peft::lowrank;  // Epilogue
constexpr int kThreads = 256;
constexpr int kRowsPerTile = 16;  // rows of Γ one backward block reads (fewer atomics into dR)
constexpr int kTile = 32;         // forward: rows and columns of a tile, ranks of a step
constexpr int kTileWarps = 8;     // forward: a block's warps, each over every kTileWarps-th row of the tile

// One block: tiles of kTile rows × kTile columns of out (rows blockIdx.y·kTile, then every
// gridDim.y·kTile on), the rank in steps of kTile: each step holds U's rows (times scale)
// and R's columns for the step in shared memory, read once per tile from global memory.
// Thread (x, y) makes column x of rows y, y + kTileWarps, …; each entry adds its products
// in rank order, whatever the rank (no shared-memory limit to reach), in the compute type T;
// W0 and out are of type Stored (T, or a 16-bit type: each entry widened, each result rounded once).
template <typename Stored, typename T>
__global__ void forward_kernel(Stored* out, const Stored* weight, const T* U, const T* R, int64_t d0, int64_t r0,
                               int64_t n, T scale, int epilogue) {
    __shared__ T u[kTile][kTile];  // u[row][a]
    __shared__ T r[kTile][kTile];  // r[a][column]
    constexpr int kRowsPerThread = kTile / kTileWarps;
    const int64_t j_raw = blockIdx.x * int64_t(kTile) + threadIdx.x;
    const bool column_in = j_raw < n;
    const int64_t j = column_in ? j_raw : n - 1;  // reads stay in bounds; nothing is written outside
    for (int64_t row0 = blockIdx.y * int64_t(kTile); row0 < d0; row0 += int64_t(gridDim.y) * kTile) {
        T delta[kRowsPerThread];
#pragma unroll
        for (int t = 0; t < kRowsPerThread; ++t) delta[t] = 0;
        for (int64_t a0 = 0; a0 < r0; a0 += kTile) {
            const int width = static_cast<int>(r0 - a0 < kTile ? r0 - a0 : kTile);
            __syncthreads();  // the previous step's reads are done
#pragma unroll
            for (int t = 0; t < kRowsPerThread; ++t) {
                const int y = threadIdx.y + t * kTileWarps;  // a row of the tile, a rank index of the step
                const int64_t i = row0 + y < d0 ? row0 + y : d0 - 1;
                if (int(threadIdx.x) < width) u[y][threadIdx.x] = scale * U[i * r0 + a0 + threadIdx.x];
                if (y < width) r[y][threadIdx.x] = R[(a0 + y) * n + j];
            }
            __syncthreads();
            for (int a = 0; a < width; ++a) {
                const T ra = r[a][threadIdx.x];
#pragma unroll
                for (int t = 0; t < kRowsPerThread; ++t) delta[t] += u[threadIdx.y + t * kTileWarps][a] * ra;
            }
        }
#pragma unroll
        for (int t = 0; t < kRowsPerThread; ++t) {
            const int64_t i = row0 + threadIdx.y + t * kTileWarps;
            if (!column_in || i >= d0) continue;
            const T w = weight ? T(widen(weight[i * n + j])) : T(0);
            const T value =
                epilogue == kAdd ? w + delta[t] : epilogue == kExp ? w * exp(delta[t]) : w * (T(1) + delta[t]);
            out[i * n + j] = narrow<Stored>(value);
        }
    }
}

// One block: a tile of kRowsPerTile rows × kThreads columns of Γ, read once and turned
// into D by the epilogue. Each thread adds its column's share of dR; each warp sums its
// 32 columns' share of dU by shuffles. Γ and W0 are of type Stored, widened to T on load.
template <typename Stored, typename T>
__global__ void backward_kernel(const Stored* grad, const Stored* weight, const T* U, const T* R, T* dU, T* dR,
                                int64_t d0, int64_t r0, int64_t n, T scale, int epilogue) {
    const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    const bool column_in = j < n;
    const int64_t row0 = blockIdx.y * static_cast<int64_t>(kRowsPerTile);
    T g[kRowsPerTile];
#pragma unroll
    for (int t = 0; t < kRowsPerTile; ++t) {
        const int64_t i = row0 + t;
        const bool in = column_in && i < d0;
        g[t] = in ? T(widen(grad[i * n + j])) : T(0);
        if (in && epilogue != kAdd) {
            g[t] *= T(widen(weight[i * n + j]));
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

}  // namespace

template <typename S, typename T>
void lowrank_forward(S* out, const S* weight, const T* U, const T* R, int64_t d0, int64_t r0, int64_t n, T scale,
                     int epilogue, std::uintptr_t stream) {
    if (d0 * n == 0) return;
    const dim3 grid(static_cast<unsigned>((n + kTile - 1) / kTile),
                    static_cast<unsigned>(std::min((d0 + kTile - 1) / kTile, kMaxGridY)));
    launch("lowrank_forward", forward_kernel<device_t<S>, T>, grid, dim3(kTile, kTileWarps), 0,
           reinterpret_cast<cudaStream_t>(stream), device_ptr(out), device_ptr(weight), U, R, d0, r0, n, scale,
           epilogue);
}

template <typename S, typename T>
void lowrank_backward(const S* grad, const S* weight, const T* U, const T* R, T* dU, T* dR, int64_t d0, int64_t r0,
                      int64_t n, T scale, int epilogue, std::uintptr_t stream) {
    const int64_t tiles = (d0 + kRowsPerTile - 1) / kRowsPerTile;
    if (tiles > kMaxGridY) throw std::invalid_argument("lowrank_backward: more than 65535·16 rows");
    const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads), static_cast<unsigned>(tiles));
    launch("lowrank_backward", backward_kernel<device_t<S>, T>, grid, kThreads, 0,
           reinterpret_cast<cudaStream_t>(stream), device_ptr(grad), device_ptr(weight), U, R, dU, dR, d0, r0, n,
           scale, epilogue);
}

#define TP_INSTANTIATE(S, T)                                                                                   \
    template void lowrank_forward<S, T>(S*, const S*, const T*, const T*, int64_t, int64_t, int64_t, T, int,    \
                                        std::uintptr_t);                                                       \
    template void lowrank_backward<S, T>(const S*, const S*, const T*, const T*, T*, T*, int64_t, int64_t,      \
                                         int64_t, T, int, std::uintptr_t);
TP_FOR_EACH_STORAGE(TP_INSTANTIATE)
#undef TP_INSTANTIATE

}  // namespace tensor_peft::cuda
