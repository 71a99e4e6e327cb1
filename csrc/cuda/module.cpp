// tensor_peft._cuda: the CUDA backend. Kernels are .cu files compiled by nvcc; this
// binding (g++) passes raw device pointers, sizes and the CUDA stream as an integer.
// No torch headers. Kernels register from PYBIND11_MODULE below.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "expm.h"
#include "runtime.h"
#include "lowrank.h"

#ifndef TP_CUDA_ARCHS
#define TP_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

template <typename T>
void bind_lowrank(py::module_& m, const std::string& suffix) {
    m.def(("lowrank_forward_" + suffix).c_str(),
          [](std::uintptr_t out, std::uintptr_t weight, std::uintptr_t U, std::uintptr_t R, int64_t d0, int64_t r0,
             int64_t n, double scale, int epilogue, std::uintptr_t stream) {
              tensor_peft::cuda::lowrank_forward<T>(ptr<T>(out), weight ? ptr<const T>(weight) : nullptr,
                                                    ptr<const T>(U), ptr<const T>(R), d0, r0, n,
                                                    static_cast<T>(scale), epilogue, stream);
          },
          "out (d0, n) from W0 and ΔW = scale·U·R by the epilogue (0 add, 1 exp, 2 taylor1; W0 0: ΔW).");
    m.def(("lowrank_backward_" + suffix).c_str(),
          [](std::uintptr_t grad, std::uintptr_t weight, std::uintptr_t U, std::uintptr_t R, int64_t d0, int64_t r0,
             int64_t n, double scale, int epilogue, std::uintptr_t dU, std::uintptr_t dR, std::uintptr_t stream) {
              tensor_peft::cuda::lowrank_backward<T>(ptr<const T>(grad), weight ? ptr<const T>(weight) : nullptr,
                                                     ptr<const T>(U), ptr<const T>(R), ptr<T>(dU), ptr<T>(dR), d0,
                                                     r0, n, static_cast<T>(scale), epilogue, stream);
          },
          "dU += scale·D·Rᵀ and dR += scale·Uᵀ·D with D = ∂L/∂ΔW from Γ by the epilogue, one read of Γ.");
}

template <typename T>
void bind_expm(py::module_& m, const std::string& suffix) {
    m.def(("matrix_exp_" + suffix).c_str(),
          [](std::uintptr_t out, std::uintptr_t A, int64_t batch, int n, std::uintptr_t work, std::uintptr_t pivots,
             std::uintptr_t stream) {
              tensor_peft::cuda::matrix_exp_forward<T>(ptr<const T>(A), ptr<T>(out), batch, n, ptr<T>(work),
                                                       ptr<int>(pivots), stream);
          },
          "out[b] = exp(A[b]); work: batch·20n² values, pivots: batch·n int32.");
    m.def(("matrix_exp_backward_" + suffix).c_str(),
          [](std::uintptr_t d_A, std::uintptr_t grad, std::uintptr_t A, int64_t batch, int n, std::uintptr_t work,
             std::uintptr_t pivots, std::uintptr_t stream) {
              tensor_peft::cuda::matrix_exp_backward<T>(ptr<const T>(grad), ptr<const T>(A), ptr<T>(d_A), batch, n,
                                                        ptr<T>(work), ptr<int>(pivots), stream);
          },
          "d_A[b] = L(A[b]ᵀ, grad[b]); work: batch·23n² values, pivots: batch·n int32.");
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "tensor_peft CUDA kernels (raw device pointers, no torch headers)";
    m.def(
        "build_info",
        [] {
            py::dict info;
            info["cuda_runtime_version"] = tensor_peft::cuda::runtime_version();
            info["nvcc_version"] = tensor_peft::cuda::nvcc_version();
            info["archs"] = TP_CUDA_ARCHS;
            return info;
        },
        "How this extension was compiled.");
    m.def("device_count", &tensor_peft::cuda::device_count,
          "CUDA devices visible; raises RuntimeError with CUDA's reason when none can be used.");
    bind_lowrank<float>(m, "f32");
    bind_lowrank<double>(m, "f64");
    bind_expm<float>(m, "f32");
    bind_expm<double>(m, "f64");
}
