// Kernels that test the emulator itself (tensor_peft._cuda_emulated.checks): what the
// launch refuses, barriers, shuffles, and a race the schedules expose. Emulated build only.
#ifdef TP_CUDA_EMULATION
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "launch.h"
#include "tensor_peft/arguments.h"

namespace tensor_peft::cuda {
namespace {

using arguments::ptr;

__global__ void empty_kernel() {}

// out[t] = the value thread t + 1 (of its block, wrapping) wrote to shared memory: after
// a barrier when `synchronize`, else a race.
__global__ void neighbour_kernel(int* out, bool synchronize) {
    __shared__ int values[1024];
    const unsigned t = threadIdx.x;
    values[t] = static_cast<int>(7 * t + blockIdx.x);
    if (synchronize) __syncthreads();
    out[blockIdx.x * blockDim.x + t] = values[(t + 1) % blockDim.x];
}

// Thread t waits at one of two __syncthreads by its parity: a divergent barrier.
__global__ void divergent_barrier_kernel(int* out) {
    if (threadIdx.x % 2) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1;
}

// Lane `exited` returns before the others shuffle over the full mask.
__global__ void exited_lane_kernel(float* out, int exited) {
    if (static_cast<int>(threadIdx.x) == exited) return;
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, out[threadIdx.x], 1);
}

// Each kind of shuffle of x over one block of up to 32 lanes, `mask` and `delta` as given:
// out (4, lanes) = shfl(x, delta), shfl_up, shfl_down, shfl_xor.
__global__ void shuffle_kernel(const double* x, double* out, unsigned mask, int delta, int width) {
    const unsigned lane = threadIdx.x;
    if (!(mask >> lane & 1u)) return;
    const double v = x[lane];
    out[lane] = __shfl_sync(mask, v, delta, width);
    out[blockDim.x + lane] = __shfl_up_sync(mask, v, delta, width);
    out[2 * blockDim.x + lane] = __shfl_down_sync(mask, v, delta, width);
    out[3 * blockDim.x + lane] = __shfl_xor_sync(mask, v, delta, width);
    __syncwarp(mask);
}

// One warp in tiles of `tile` lanes, each synchronizing only itself by __syncwarp on its
// mask, tile k for k + 1 rounds: out[lane] = Σ over rounds r of the value its right
// neighbour in the tile (wrapping) wrote in shared memory, 100·r + neighbour. With
// `overlap`, the upper half's tiles name lanes 8–31 instead: masks that overlap a tile's.
__global__ void tiles_kernel(int* out, int tile, bool overlap) {
    __shared__ int values[32];
    const int lane = static_cast<int>(threadIdx.x), first = lane / tile * tile;
    unsigned mask = (tile == 32 ? ~0u : (1u << tile) - 1u) << first;
    if (overlap && lane >= 16) mask = 0xffffff00u;
    int sum = 0;
    for (int round = 0; round <= lane / tile; ++round) {
        values[lane] = 100 * round + lane;
        __syncwarp(mask);
        sum += values[first + (lane - first + 1) % tile];
        __syncwarp(mask);
    }
    out[lane] = sum;
}

dim3 to_dim3(const pybind11::tuple& t) {
    return dim3(t[0].cast<unsigned>(), t[1].cast<unsigned>(), t[2].cast<unsigned>());
}

}  // namespace

void bind_emulation_checks(pybind11::module_& m) {
    auto checks = m.def_submodule("checks", "Kernels that test the emulator itself.");
    checks.def(
        "launch_empty",
        [](const pybind11::tuple& grid, const pybind11::tuple& block, size_t shared, int allowed) {
            if (allowed >= 0 &&
                cudaFuncSetAttribute(empty_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, allowed) != cudaSuccess)
                throw std::invalid_argument("empty_kernel: cudaFuncSetAttribute refused " + std::to_string(allowed) +
                                            " bytes of dynamic shared memory");
            launch("empty_kernel", empty_kernel, to_dim3(grid), to_dim3(block), shared, nullptr);
        },
        pybind11::arg("grid"), pybind11::arg("block"), pybind11::arg("shared"), pybind11::arg("allowed") = -1,
        "Launches a kernel that does nothing; allowed ≥ 0: its dynamic shared memory limit first.");
    checks.def(
        "neighbour",
        [](std::uintptr_t out, unsigned blocks, unsigned threads, bool synchronize) {
            launch("neighbour_kernel", neighbour_kernel, blocks, threads, 0, nullptr, ptr<int>(out), synchronize);
        },
        pybind11::arg("out"), pybind11::arg("blocks"), pybind11::arg("threads"), pybind11::arg("synchronize"),
        "out[b·threads + t] = 7·((t + 1) mod threads) + b, read from shared memory.");
    checks.def(
        "divergent_barrier",
        [](std::uintptr_t out, unsigned threads) {
            launch("divergent_barrier_kernel", divergent_barrier_kernel, 1, threads, 0, nullptr, ptr<int>(out));
        },
        pybind11::arg("out"), pybind11::arg("threads"));
    checks.def(
        "exited_lane",
        [](std::uintptr_t out, unsigned threads, int exited) {
            launch("exited_lane_kernel", exited_lane_kernel, 1, threads, 0, nullptr, ptr<float>(out), exited);
        },
        pybind11::arg("out"), pybind11::arg("threads"), pybind11::arg("exited"));
    checks.def(
        "shuffle",
        [](std::uintptr_t x, std::uintptr_t out, unsigned lanes, unsigned mask, int delta, int width) {
            launch("shuffle_kernel", shuffle_kernel, 1, lanes, 0, nullptr, ptr<const double>(x), ptr<double>(out), mask,
                   delta, width);
        },
        pybind11::arg("x"), pybind11::arg("out"), pybind11::arg("lanes"), pybind11::arg("mask"), pybind11::arg("delta"),
        pybind11::arg("width"));
    checks.def(
        "tiles",
        [](std::uintptr_t out, int tile, bool overlap) {
            launch("tiles_kernel", tiles_kernel, 1, 32, 0, nullptr, ptr<int>(out), tile, overlap);
        },
        pybind11::arg("out"), pybind11::arg("tile"), pybind11::arg("overlap"),
        "A warp in tiles that synchronize apart, a different number of rounds each.");
}

}  // namespace tensor_peft::cuda
#endif
