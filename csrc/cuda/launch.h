// What the CUDA launchers (.cu files) share.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace tensor_peft::cuda {

// The largest grid y (and z) dimension CUDA allows.
constexpr int64_t kMaxGridY = 65535;

// std::runtime_error naming the launcher when the last launch failed.
inline void check_launch(const char* name) {
    const cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) throw std::runtime_error(std::string(name) + ": " + cudaGetErrorString(status));
}

}  // namespace tensor_peft::cuda
