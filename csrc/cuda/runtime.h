// Host-side CUDA runtime queries of tensor_peft._cuda, compiled by nvcc (runtime.cu)
// and called from the pybind11 binding (module.cpp, compiled by g++).
#pragma once

#include <string>

namespace tensor_peft::cuda {

// Number of CUDA devices; throws std::runtime_error with CUDA's message on failure.
int device_count();
// Version of the CUDA runtime linked in (e.g. 13000) and of the nvcc that compiled it
// (under emulation: 0, and the g++ that compiled it).
int runtime_version();
// The newest CUDA version the installed driver supports (e.g. 12040), 0 without a driver.
int driver_version();
std::string nvcc_version();

}  // namespace tensor_peft::cuda
