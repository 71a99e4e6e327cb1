#include <stdexcept>
#include <string>

#include "launch.h"
#include "runtime.h"

namespace tensor_peft::cuda {

int device_count() {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
        throw std::runtime_error(std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(status));
    }
    return count;
}

#ifdef TP_CUDA_EMULATION
int runtime_version() { return 0; }

int driver_version() { return 0; }

std::string nvcc_version() { return "none (emulated, g++ " __VERSION__ ")"; }
#else
int runtime_version() { return CUDART_VERSION; }

int driver_version() {
    int version = 0;
    if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
    return version;
}

std::string nvcc_version() {
    return std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__);
}
#endif

}  // namespace tensor_peft::cuda
