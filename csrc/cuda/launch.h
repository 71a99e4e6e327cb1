// What the CUDA launchers (.cu files) share: the CUDA runtime, or its emulation on the
// host when built by g++ with TP_CUDA_EMULATION (emulation.h); the block's dynamic shared
// memory; and launch(), the one way they start a kernel.
#pragma once

#ifdef TP_CUDA_EMULATION
#include "emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <stdexcept>
#include <string>

// T* name: the block's dynamic shared memory (the launch's `shared` bytes), 16-byte aligned.
#ifdef TP_CUDA_EMULATION
#define TP_DYNAMIC_SHARED(T, name) TP_EMU_DYNAMIC_SHARED(T, name)
#else
#define TP_DYNAMIC_SHARED(T, name)                                    \
    extern __shared__ __align__(16) unsigned char tp_dynamic_shared[]; \
    T* name = reinterpret_cast<T*>(tp_dynamic_shared)
#endif

namespace tensor_peft::cuda {

// The largest grid y (and z) dimension CUDA allows.
constexpr int64_t kMaxGridY = 65535;
// Dynamic shared memory a kernel may take without cudaFuncSetAttribute.
constexpr size_t kDefaultSharedLimit = 48 * 1024;

inline std::string dimensions(dim3 d) {
    return std::to_string(d.x) + "×" + std::to_string(d.y) + "×" + std::to_string(d.z);
}

// std::invalid_argument naming the kernel for a configuration the GPU refuses: the block's
// threads, the grid's blocks, or dynamic shared memory past `shared_limit` (what the kernel
// was allowed).
inline void check_configuration(const char* kernel, dim3 grid, dim3 block, size_t shared, size_t shared_limit) {
    const auto refuse = [kernel](const std::string& what) {
        throw std::invalid_argument(std::string(kernel) + ": " + what);
    };
    if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
        uint64_t(block.x) * block.y * block.z > 1024)
        refuse("a block of " + dimensions(block) + " threads; CUDA allows 1 to 1024 (x, y ≤ 1024, z ≤ 64)");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > kMaxGridY ||
        grid.z > kMaxGridY)
        refuse("a grid of " + dimensions(grid) + " blocks; CUDA allows x ≤ 2³¹−1, y and z ≤ 65535, none 0");
    if (shared > shared_limit)
        refuse(std::to_string(shared) + " bytes of dynamic shared memory, more than the " +
               std::to_string(shared_limit) + " it was allowed (above 48 KiB: cudaFuncSetAttribute)");
}

// kernel<<<grid, block, shared, stream>>>(args...) after check_configuration; failures
// raise naming `name`. Under emulation the kernel runs on the host before this returns.
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
            Args... args) {
#ifdef TP_CUDA_EMULATION
    const auto allowed = emu::shared_opt_ins.find(reinterpret_cast<const void*>(kernel));
    check_configuration(name, grid, block, shared,
                        allowed == emu::shared_opt_ins.end() ? kDefaultSharedLimit : allowed->second);
    if (shared > emu::kSm80SharedOptin && emu::settings.report)
        emu::settings.report(std::string(name) + ": " + std::to_string(shared) +
                             " bytes of dynamic shared memory, more than sm_80 GPUs allow (" +
                             std::to_string(emu::kSm80SharedOptin) + ")");
    (void)stream;
    emu::run_grid(name, grid, block, shared, [&] { kernel(args...); });
#else
    size_t limit = kDefaultSharedLimit;
    if (shared > limit) {
        cudaFuncAttributes attributes;
        if (cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess) limit = attributes.maxDynamicSharedSizeBytes;
    }
    check_configuration(name, grid, block, shared, limit);
    kernel<<<grid, block, shared, stream>>>(args...);
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) throw std::runtime_error(std::string(name) + ": " + cudaGetErrorString(status));
#endif
}

}  // namespace tensor_peft::cuda
