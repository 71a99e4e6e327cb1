// tensor_peft._cuda: the CUDA backend. Kernels are .cu files compiled by nvcc; this
// binding (g++) passes raw device pointers, sizes and the CUDA stream as an integer.
// No torch headers. Kernels register from PYBIND11_MODULE below.
#include <pybind11/pybind11.h>

#include "runtime.h"

#ifndef TP_CUDA_ARCHS
#define TP_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "tensor_peft CUDA kernels (raw device pointers, no torch headers)";
    m.def(
        "build_info",
        [] {
            py::dict info;
            info["cuda_runtime"] = tensor_peft::cuda::runtime_version();
            info["nvcc"] = tensor_peft::cuda::nvcc_version();
            info["archs"] = TP_CUDA_ARCHS;
            return info;
        },
        "How this extension was compiled.");
    m.def("device_count", &tensor_peft::cuda::device_count,
          "CUDA devices visible; raises RuntimeError with CUDA's reason when none can be used.");
}
