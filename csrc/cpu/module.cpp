// tensor_peft._C: the CPU backend's C++17/OpenMP kernels. No torch headers: the Python
// op layer validates tensors and passes raw pointers and sizes. Kernels live in their
// own .cpp files beside this one and are registered from PYBIND11_MODULE below.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "tensor_peft/binding.h"
#include "tensor_peft/threads.h"

#ifndef TP_MARCH
#define TP_MARCH "default"
#endif

namespace py = pybind11;

void register_lowrank(py::module_& m);  // lowrank.cpp
void register_expm(py::module_& m);     // expm.cpp
void register_kernelized(py::module_& m);  // kernelized.cpp

namespace {

py::dict build_info() {
    py::dict info;
    info["compiler"] = __VERSION__;
    info["cxx_standard"] = static_cast<long>(__cplusplus);
#ifdef _OPENMP
    info["openmp"] = true;
    info["openmp_version"] = static_cast<long>(_OPENMP);  // yyyymm of the OpenMP spec
#else
    info["openmp"] = false;
    info["openmp_version"] = py::none();
#endif
    info["march"] = TP_MARCH;
    return info;
}


}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "tensor_peft CPU kernels (C++17/OpenMP, raw pointers, no torch headers)";
    m.def("build_info", &build_info, "How this extension was compiled.");
    m.def("max_threads", &tensor_peft::cpu::max_thread_count, "OpenMP threads a parallel region gets.");
    m.def("set_max_threads",
          [](int64_t count) {
              if (count < 1) throw py::value_error("count must be at least 1, got " + std::to_string(count));
              tensor_peft::cpu::set_max_thread_count(static_cast<int>(std::min<int64_t>(count, 1 << 16)));
          },
          py::arg("count"),
          "The OpenMP threads parallel regions started from this thread get (results do not depend on it).");
    tensor_peft::binding::export_ids(m);
    register_lowrank(m);
    register_expm(m);
    register_kernelized(m);
}
