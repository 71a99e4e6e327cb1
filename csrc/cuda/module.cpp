// tensor_peft._cuda: the CUDA backend. Kernels are .cu files compiled by nvcc; this
// binding (g++) passes raw device pointers, sizes and the CUDA stream as an integer.
// No torch headers. Kernels register from PYBIND11_MODULE below.
// Suffixes name the storage dtype of a kernel's large tensors: _f32 and _f64 compute in it,
// _bf16 and _f16 in float32 (half.h); matrix_exp has _f32 and _f64 only.
// tensor_peft._cuda_emulated (TP_CUDA_EMULATION, TP_CUDA_MODULE=_cuda_emulated): the same
// sources compiled by g++ with launch.h's emulation of CUDA; pointers are host memory,
// and set_schedule / set_compute_capability steer the emulator.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "expm.h"
#include "half.h"
#include "kernelized.h"
#include "lowrank.h"
#include "runtime.h"
#include "tensor_peft/arguments.h"
#include "tensor_peft/binding.h"

#ifndef TP_CUDA_ARCHS
#define TP_CUDA_ARCHS "unknown"
#endif
#ifndef TP_CUDA_MODULE
#define TP_CUDA_MODULE _cuda
#endif
#ifdef TP_CUDA_EMULATION
#include "emulation.h"
namespace tensor_peft::cuda {
void bind_emulation_checks(pybind11::module_& m);  // emulation_checks.cu
}
#endif

namespace py = pybind11;

namespace {

using tensor_peft::arguments::ptr;

using tensor_peft::cuda::BFloat16;
using tensor_peft::cuda::Float16;

// S: the storage of out, W0 and Γ; T: the compute type of U, R, dU, dR and scale.
template <typename S, typename T>
void bind_lowrank(py::module_& m, const std::string& suffix) {
    m.def(("lowrank_forward_" + suffix).c_str(),
          [](std::uintptr_t out, std::uintptr_t weight, std::uintptr_t U, std::uintptr_t R, int64_t d0, int64_t r0,
             int64_t n, double scale, int epilogue, std::uintptr_t stream) {
              tensor_peft::cuda::lowrank_forward<S, T>(ptr<S>(out), weight ? ptr<const S>(weight) : nullptr,
                                                    ptr<const T>(U), ptr<const T>(R), d0, r0, n,
                                                    static_cast<T>(scale), epilogue, stream);
          },
          py::arg("out"), py::arg("weight"), py::arg("U"), py::arg("R"), py::arg("d0"), py::arg("r0"),
          py::arg("n"), py::arg("scale"), py::arg("epilogue"), py::arg("stream"),
          "out (d0, n) from W0 and ΔW = scale·U·R by the epilogue (0 add, 1 exp, 2 taylor1; W0 0: ΔW).");
    m.def(("lowrank_backward_" + suffix).c_str(),
          [](std::uintptr_t grad, std::uintptr_t weight, std::uintptr_t U, std::uintptr_t R, int64_t d0, int64_t r0,
             int64_t n, double scale, int epilogue, std::uintptr_t dU, std::uintptr_t dR, std::uintptr_t stream) {
              tensor_peft::cuda::lowrank_backward<S, T>(ptr<const S>(grad), weight ? ptr<const S>(weight) : nullptr,
                                                     ptr<const T>(U), ptr<const T>(R), ptr<T>(dU), ptr<T>(dR), d0,
                                                     r0, n, static_cast<T>(scale), epilogue, stream);
          },
          py::arg("grad"), py::arg("weight"), py::arg("U"), py::arg("R"), py::arg("d0"), py::arg("r0"),
          py::arg("n"), py::arg("scale"), py::arg("epilogue"), py::arg("dU"), py::arg("dR"), py::arg("stream"),
          "dU += scale·D·Rᵀ and dR += scale·Uᵀ·D with D = ∂L/∂ΔW from Γ by the epilogue, one read of Γ.");
}

template <typename T>
void bind_expm(py::module_& m, const std::string& suffix) {
    m.def(("matrix_exp_" + suffix).c_str(),
          [](std::uintptr_t out, std::uintptr_t A, int64_t batch, int n, std::uintptr_t work, std::uintptr_t stream) {
              tensor_peft::cuda::matrix_exp_forward<T>(ptr<const T>(A), ptr<T>(out), batch, n, ptr<T>(work), stream);
          },
          py::arg("out"), py::arg("A"), py::arg("batch"), py::arg("n"), py::arg("work"), py::arg("stream"),
          "out[b] = exp(A[b]); work: batch·matrix_exp_workspace(n, False) values.");
    m.def(("matrix_exp_backward_" + suffix).c_str(),
          [](std::uintptr_t d_A, std::uintptr_t grad, std::uintptr_t A, int64_t batch, int n, std::uintptr_t work,
             std::uintptr_t stream) {
              tensor_peft::cuda::matrix_exp_backward<T>(ptr<const T>(grad), ptr<const T>(A), ptr<T>(d_A), batch, n,
                                                        ptr<T>(work), stream);
          },
          py::arg("d_A"), py::arg("grad"), py::arg("A"), py::arg("batch"), py::arg("n"), py::arg("work"),
          py::arg("stream"), "d_A[b] = L(A[b]ᵀ, grad[b]); work: batch·matrix_exp_workspace(n, True) values.");
    m.def(("matrix_exp_workspace_" + suffix).c_str(), &tensor_peft::cuda::matrix_exp_workspace<T>, py::arg("n"),
          py::arg("backward"),
          "Values of global workspace matrix_exp (backward False) or matrix_exp_backward takes per n×n matrix on "
          "the current device: 0 when shared memory holds it.");
}

// S: the storage of ΔW, Γ and sparsify's tensors; T: the compute type of everything else.
template <typename S, typename T>
void bind_kernelized(py::module_& m, const std::string& suffix) {
    using tensor_peft::cuda::Kernelized;
    auto problem = [](std::uintptr_t out_emb, std::uintptr_t in_t, int64_t rows, int64_t n, int64_t chunks,
                      int64_t width, int kernel, std::uintptr_t coeff, std::uintptr_t params, double eps,
                      std::uintptr_t columns) {
        return Kernelized<T>{ptr<const T>(out_emb), ptr<const T>(in_t), rows, n, chunks, width, kernel,
                             ptr<const T>(coeff), ptr<const T>(params), static_cast<T>(eps), ptr<T>(columns)};
    };
    m.def(("kernelized_forward_" + suffix).c_str(),
          [problem](std::uintptr_t out, std::uintptr_t out_emb, std::uintptr_t in_t, int64_t rows, int64_t n,
                    int64_t chunks, int64_t width, int kernel, std::uintptr_t coeff, std::uintptr_t params, double eps,
                    int64_t k, int mode, std::uintptr_t tau, std::uintptr_t raw, std::uintptr_t columns,
                    std::uintptr_t select_work, std::uintptr_t stream) {
              tensor_peft::cuda::kernelized_forward<S, T>(
                  problem(out_emb, in_t, rows, n, chunks, width, kernel, coeff, params, eps, columns), ptr<S>(out),
                  ptr<T>(raw), k, mode, ptr<T>(tau), ptr<int64_t>(select_work), stream);
          },
          py::arg("out"), py::arg("out_emb"), py::arg("in_t"), py::arg("rows"), py::arg("n"), py::arg("chunks"),
          py::arg("width"), py::arg("kernel"), py::arg("coeff"), py::arg("params"), py::arg("eps"), py::arg("k"),
          py::arg("mode"), py::arg("tau"), py::arg("raw"), py::arg("columns"), py::arg("select_work"),
          py::arg("stream"),
          "out (m, n) = κ(Out, In) (In as (H, p, n)); mode 1/2: κ into raw (m, n, compute dtype; may be out for "
          "_f32/_f64), then sparsified into out with τ, written to tau when k > 0. columns: "
          "kernelized_columns_workspace values; select_work: kernelized_select_workspace int64 values.");
    m.def(("kernelized_backward_" + suffix).c_str(),
          [problem](std::uintptr_t grad, std::uintptr_t out_emb, std::uintptr_t in_t, int64_t rows, int64_t n,
                    int64_t chunks, int64_t width, int kernel, std::uintptr_t coeff, std::uintptr_t params, double eps,
                    std::uintptr_t tau, int mode, std::uintptr_t d_out_emb, std::uintptr_t d_in_t,
                    std::uintptr_t d_coeff, std::uintptr_t d_params, std::uintptr_t columns, std::uintptr_t stream) {
              tensor_peft::cuda::kernelized_backward<S, T>(
                  problem(out_emb, in_t, rows, n, chunks, width, kernel, coeff, params, eps, columns),
                  ptr<const S>(grad), tau ? ptr<const T>(tau) : nullptr, mode, ptr<T>(d_out_emb), ptr<T>(d_in_t),
                  ptr<double>(d_coeff), ptr<double>(d_params), stream);
          },
          py::arg("grad"), py::arg("out_emb"), py::arg("in_t"), py::arg("rows"), py::arg("n"), py::arg("chunks"),
          py::arg("width"), py::arg("kernel"), py::arg("coeff"), py::arg("params"), py::arg("eps"), py::arg("tau"),
          py::arg("mode"), py::arg("d_out_emb"), py::arg("d_in_t"), py::arg("d_coeff"), py::arg("d_params"),
          py::arg("columns"), py::arg("stream"),
          "Adds the gradients of the embeddings (In as (H, p, n)) into d_out_emb, d_in_t and of the kernel "
          "parameters into float64 d_coeff, d_params; κ recomputed, mode 1/2 with the forward's τ.");
    m.def(("sparsify_" + suffix).c_str(),
          [](std::uintptr_t out, std::uintptr_t delta, int64_t count, int64_t k, int mode, std::uintptr_t tau,
             std::uintptr_t select_work, std::uintptr_t stream) {
              tensor_peft::cuda::sparsify<S, T>(ptr<const S>(delta), ptr<S>(out), count, k, mode, ptr<T>(tau),
                                             ptr<int64_t>(select_work), stream);
          },
          py::arg("out"), py::arg("delta"), py::arg("count"), py::arg("k"), py::arg("mode"), py::arg("tau"),
          py::arg("select_work"), py::arg("stream"),
          "out = the sparsified delta (mode 1 hard, 2 soft); τ written to tau when k > 0.");
    m.def(("sparsify_backward_" + suffix).c_str(),
          [](std::uintptr_t d_delta, std::uintptr_t grad, std::uintptr_t delta, int64_t count, std::uintptr_t tau,
             int mode, std::uintptr_t stream) {
              tensor_peft::cuda::sparsify_backward<S, T>(ptr<const S>(grad), ptr<const S>(delta), ptr<S>(d_delta),
                                                         count, ptr<const T>(tau), mode, stream);
          },
          py::arg("d_delta"), py::arg("grad"), py::arg("delta"), py::arg("count"), py::arg("tau"), py::arg("mode"),
          py::arg("stream"),
          "∂L/∂delta of the sparsification with τ (and, hard, |delta|) held constant.");
    m.def(("kernelized_select_workspace_" + suffix).c_str(),
          [] { return tensor_peft::cuda::select_workspace(sizeof(T) == sizeof(double)); },
          "int64 values of workspace the radix select takes.");
}

#ifdef TP_CUDA_EMULATION
void bind_emulator(py::module_& m) {
    namespace emu = tensor_peft::emu;
    emu::settings.report = [](const std::string& note) {
        if (PyErr_WarnEx(PyExc_RuntimeWarning, note.c_str(), 1) < 0) throw py::error_already_set();
    };
    m.def(
        "set_schedule",
        [](const std::string& order, uint64_t seed) {
            if (order == "forward") emu::settings.schedule = emu::Schedule::forward;
            else if (order == "reverse") emu::settings.schedule = emu::Schedule::reverse;
            else if (order == "shuffle") emu::settings.schedule = emu::Schedule::shuffle;
            else throw std::invalid_argument("order must be 'forward', 'reverse' or 'shuffle', got '" + order + "'");
            emu::settings.seed = seed;
        },
        py::arg("order"), py::arg("seed") = 0,
        "The order the emulator runs a block's threads in between barriers and a grid's blocks in: 'forward', "
        "'reverse', or 'shuffle' (seeded); kernels without races give the same results under each.");
    m.def(
        "set_compute_capability",
        [](int capability) {
            if (capability != 80 && capability != 90)
                throw std::invalid_argument("capability must be 80 or 90, got " + std::to_string(capability));
            emu::settings.compute_capability = capability;
        },
        py::arg("capability"),
        "The emulated GPU's shared-memory limits: 80 (163 KiB opt-in) or 90 (227 KiB, the default). Under 90, a "
        "launch past sm_80's limit warns (RuntimeWarning).");
}
#endif

}  // namespace

PYBIND11_MODULE(TP_CUDA_MODULE, m) {
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
    m.def("driver_version", &tensor_peft::cuda::driver_version,
          "The newest CUDA version the installed driver supports (e.g. 12040); 0 without a driver.");
    m.def("device_count", &tensor_peft::cuda::device_count,
          "CUDA devices visible; raises RuntimeError with CUDA's reason when none can be used.");
    m.def("kernelized_columns_workspace", &tensor_peft::cuda::columns_workspace, py::arg("n"), py::arg("kernel"),
          "Values of the columns workspace the kernelized kernels take for n columns and this kernel.");
    tensor_peft::binding::export_ids(m);
    bind_lowrank<float, float>(m, "f32");
    bind_lowrank<double, double>(m, "f64");
    bind_lowrank<BFloat16, float>(m, "bf16");
    bind_lowrank<Float16, float>(m, "f16");
    bind_expm<float>(m, "f32");
    bind_expm<double>(m, "f64");
    bind_kernelized<float, float>(m, "f32");
    bind_kernelized<double, double>(m, "f64");
    bind_kernelized<BFloat16, float>(m, "bf16");
    bind_kernelized<Float16, float>(m, "f16");
#ifdef TP_CUDA_EMULATION
    bind_emulator(m);
    tensor_peft::cuda::bind_emulation_checks(m);
#endif
}
