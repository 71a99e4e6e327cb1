// SNELL's kernelized low-rank update and its competition sparsification: the argument
// checks and bindings. The rows are in kernelized_rows.h, the forward (the selection of τ
// and the mask, mode 1 hard, 2 soft) in kernelized_select.h, the backward in
// kernelized_backward.h.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernelized_backward.h"
#include "kernelized_rows.h"
#include "kernelized_select.h"
#include "tensor_peft/arguments.h"

namespace py = pybind11;

namespace {

namespace arguments = tensor_peft::arguments;

// The embeddings' sizes and the kernel's arguments, checked; pointers checked for the
// values they address.
template <typename T>
Problem<T> problem(std::uintptr_t out_emb, std::uintptr_t in_t, int64_t m, int64_t n, int64_t chunks, int64_t width,
                   int64_t kernel, std::uintptr_t coeff, std::uintptr_t params, double eps) {
    using arguments::pointer, arguments::product, arguments::size;
    const int64_t rank = product(size(chunks, "chunks"), size(width, "width"), "chunks × width");
    product(size(m, "rows"), size(n, "n"), "rows × n");
    const T* p = pointer<const T>(params, 3, "params");
    return Problem<T>{pointer<const T>(out_emb, product(rank, m, "out_emb's size"), "out_emb"),
                      pointer<const T>(in_t, product(rank, n, "in_t's size"), "in_t"),
                      m, n, chunks, width,
                      arguments::choice(kernel, kPiecewise, kMixture, "kernel"),
                      pointer<const T>(coeff, chunks, "coeff"),
                      p[0], p[1], p[2], static_cast<T>(eps)};  // fmt: skip
}

// The gradient outputs of the backward kernels, checked.
template <typename T>
struct Gradients {
    T *d_out_emb, *d_in_t, *d_coeff, *d_params;
    Gradients(const Problem<T>& P, std::uintptr_t out, std::uintptr_t in, std::uintptr_t coeff, std::uintptr_t params)
        : d_out_emb(arguments::pointer<T>(out, P.chunks * P.width * P.m, "d_out_emb")),
          d_in_t(arguments::pointer<T>(in, P.chunks * P.width * P.n, "d_in_t")),
          d_coeff(arguments::pointer<T>(coeff, P.chunks, "d_coeff")),
          d_params(arguments::pointer<T>(params, 3, "d_params")) {}
};

// W0's rows (rows × n, row j at weight + j·stride) that a sparsified ΔW is added onto: none
// for address 0.
template <typename T>
const T* base_weight(std::uintptr_t address, int64_t rows, int64_t n, int64_t stride) {
    if (address == 0) return nullptr;
    arguments::at_least(stride, n, "weight_stride");
    const int64_t extent = rows == 0 ? 0 : arguments::product(rows - 1, stride, "weight's extent") + n;
    return arguments::pointer<const T>(address, extent, "weight");
}

// The sparsified ΔW's output of a backward kernel: none for address 0, else rows × n values,
// W0 + ΔW onto the rows of W0 at `weight` (address 0: none; weight_stride values apart);
// only a sparsified ΔW (mode ≠ kNone) has one.
template <typename T>
DeltaOutput<T> sparsified_output(std::uintptr_t address, std::uintptr_t weight, int64_t weight_stride, int64_t rows,
                                 int64_t n, int mode) {
    if (address == 0) {
        if (weight != 0) throw py::value_error("weight: W0 is only read to write W0 + ΔW into a delta");
        return {};
    }
    if (mode == kNone) throw py::value_error("delta: only a sparsified ΔW (mode 1 or 2) is written by the backward");
    return {arguments::pointer<T>(address, rows * n, "delta"), base_weight<T>(weight, rows, n, weight_stride),
            weight_stride};
}

template <typename T>
void bind(py::module_& m, const std::string& suffix) {
    using arguments::pointer;
    m.def(("kernelized_forward_" + suffix).c_str(),
          [](std::uintptr_t out, std::uintptr_t out_emb, std::uintptr_t in_t, int64_t rows, int64_t n, int64_t chunks,
             int64_t width, int64_t kernel, std::uintptr_t coeff, std::uintptr_t params, double eps, int64_t k,
             int64_t mode, double given_tau) {
              Problem<T> P = problem<T>(out_emb, in_t, rows, n, chunks, width, kernel, coeff, params, eps);
              const int sparsification = arguments::choice(mode, kNone, kSoft, "mode");
              arguments::at_most(arguments::size(k, "k"), rows * n, "k");
              T* o = pointer<T>(out, rows * n, "out");
              py::gil_scoped_release release;
              tensor_peft::cpu::advise_huge_pages(o, rows * n * sizeof(T));
              return double(forward(P, o, k, sparsification, static_cast<T>(given_tau)));
          },
          py::arg("out"), py::arg("out_emb"), py::arg("in_t"), py::arg("rows"), py::arg("n"), py::arg("chunks"),
          py::arg("width"), py::arg("kernel"), py::arg("coeff"), py::arg("params"), py::arg("eps"), py::arg("k"),
          py::arg("mode"), py::arg("given_tau"),
          "out (m, n) = κ(Out, In) (In given as (H, p, n)); with mode 1/2, sparsified in place by τ: "
          "the k-th smallest magnitude for k > 0, else given_tau. Returns τ.");
    m.def(("kernelized_backward_" + suffix).c_str(),
          [](std::uintptr_t grad, std::uintptr_t out_emb, std::uintptr_t in_t, int64_t rows, int64_t n, int64_t chunks,
             int64_t width, int64_t kernel, std::uintptr_t coeff, std::uintptr_t params, double eps, double tau,
             int64_t mode, std::uintptr_t d_out_emb, std::uintptr_t d_in_t, std::uintptr_t d_coeff,
             std::uintptr_t d_params, std::uintptr_t delta, std::uintptr_t weight, int64_t weight_stride) {
              Problem<T> P = problem<T>(out_emb, in_t, rows, n, chunks, width, kernel, coeff, params, eps);
              const int sparsification = arguments::choice(mode, kNone, kSoft, "mode");
              const T* g = pointer<const T>(grad, rows * n, "grad");
              const Gradients<T> d(P, d_out_emb, d_in_t, d_coeff, d_params);
              const DeltaOutput<T> out_delta = sparsified_output<T>(delta, weight, weight_stride, rows, n, sparsification);
              py::gil_scoped_release release;
              if (out_delta.values != nullptr)
                  tensor_peft::cpu::advise_huge_pages(out_delta.values, rows * n * sizeof(T));
              backward(P, Upstream<T>{g, nullptr}, static_cast<T>(tau), sparsification, out_delta, d.d_out_emb,
                       d.d_in_t, d.d_coeff, d.d_params);
          },
          py::arg("grad"), py::arg("out_emb"), py::arg("in_t"), py::arg("rows"), py::arg("n"), py::arg("chunks"),
          py::arg("width"), py::arg("kernel"), py::arg("coeff"), py::arg("params"), py::arg("eps"), py::arg("tau"),
          py::arg("mode"), py::arg("d_out_emb"), py::arg("d_in_t"), py::arg("d_coeff"), py::arg("d_params"),
          py::arg("delta") = 0, py::arg("weight") = 0, py::arg("weight_stride") = 0,
          "Gradients of the embeddings (In as (H, p, n)) and kernel parameters from ∂L/∂out, the rows "
          "recomputed; mode 1/2 with the τ of the forward, and then, given a delta (m, n) address, the "
          "sparsified ΔW written there (W0 + ΔW given W0's rows at `weight`, weight_stride apart).");
    m.def(("sparse_linear_backward_" + suffix).c_str(),
          [](std::uintptr_t grad_out, std::uintptr_t input, int64_t tokens, std::uintptr_t out_emb, std::uintptr_t in_t,
             int64_t rows, int64_t n, int64_t chunks, int64_t width, int64_t kernel, std::uintptr_t coeff,
             std::uintptr_t params, double eps, double tau, int64_t mode, std::uintptr_t d_out_emb,
             std::uintptr_t d_in_t, std::uintptr_t d_coeff, std::uintptr_t d_params, std::uintptr_t delta,
             std::uintptr_t weight, int64_t weight_stride) {
              Problem<T> P = problem<T>(out_emb, in_t, rows, n, chunks, width, kernel, coeff, params, eps);
              const int sparsification = arguments::choice(mode, kHard, kSoft, "mode");
              const DeltaOutput<T> out_delta = sparsified_output<T>(delta, weight, weight_stride, rows, n, sparsification);
              arguments::at_most(n, INT32_MAX, "n");  // kept entries hold their column in 32 bits
              arguments::size(tokens, "tokens");
              const T* g = pointer<const T>(grad_out, arguments::product(tokens, rows, "tokens × rows"), "grad_out");
              const T* x = pointer<const T>(input, arguments::product(tokens, n, "tokens × n"), "input");
              const Gradients<T> d(P, d_out_emb, d_in_t, d_coeff, d_params);
              py::gil_scoped_release release;
              if (out_delta.values != nullptr)
                  tensor_peft::cpu::advise_huge_pages(out_delta.values, rows * n * sizeof(T));
              const T t = static_cast<T>(tau);
              ColumnStatistics<T> held;
              ensure_statistics(P, held);  // the mask needs ΔW_raw's rows
              const SparseRows<T> D = sampled_upstream(P, g, x, tokens, t, sparsification, out_delta);
              backward(P, Upstream<T>{nullptr, &D}, t, sparsification, DeltaOutput<T>{}, d.d_out_emb, d.d_in_t,
                       d.d_coeff, d.d_params);
          },
          py::arg("grad_out"), py::arg("input"), py::arg("tokens"), py::arg("out_emb"), py::arg("in_t"),
          py::arg("rows"), py::arg("n"), py::arg("chunks"), py::arg("width"), py::arg("kernel"), py::arg("coeff"),
          py::arg("params"), py::arg("eps"), py::arg("tau"), py::arg("mode"), py::arg("d_out_emb"), py::arg("d_in_t"),
          py::arg("d_coeff"), py::arg("d_params"), py::arg("delta") = 0, py::arg("weight") = 0,
          py::arg("weight_stride") = 0,
          "As kernelized_backward (mode 1/2) for ΔW in a linear layer, from grad_out (tokens, m) and input "
          "(tokens, n): ∂L/∂out = grad_outᵀ·input is computed only where the mask keeps an entry.");
    m.def(("sparsify_" + suffix).c_str(),
          [](std::uintptr_t out, std::uintptr_t delta, int64_t count, int64_t k, int64_t mode) {
              arguments::size(count, "count");
              arguments::at_most(arguments::size(k, "k"), count, "k");
              const int sparsification = arguments::choice(mode, kHard, kSoft, "mode");
              T* o = pointer<T>(out, count, "out");
              const T* x = pointer<const T>(delta, count, "delta");
              py::gil_scoped_release release;
              const T tau = kth_smallest_magnitude(x, count, k);
              mask(x, o, count, tau, sparsification);
              return double(tau);
          },
          py::arg("out"), py::arg("delta"), py::arg("count"), py::arg("k"), py::arg("mode"),
          "out = the sparsified delta (mode 1 hard, 2 soft); returns τ.");
    m.def(("sparsify_backward_" + suffix).c_str(),
          [](std::uintptr_t d_delta, std::uintptr_t grad, std::uintptr_t delta, int64_t count, double tau,
             int64_t mode) {
              arguments::size(count, "count");
              const int sparsification = arguments::choice(mode, kHard, kSoft, "mode");
              T* d = pointer<T>(d_delta, count, "d_delta");
              const T* g = pointer<const T>(grad, count, "grad");
              const T* x = pointer<const T>(delta, count, "delta");
              py::gil_scoped_release release;
              const T t = static_cast<T>(tau);
#pragma omp parallel for schedule(static)
              for (int64_t i = 0; i < count; ++i) d[i] = g[i] * mask_factor(x[i], t, sparsification, true);
          },
          py::arg("d_delta"), py::arg("grad"), py::arg("delta"), py::arg("count"), py::arg("tau"), py::arg("mode"),
          "∂L/∂delta of the sparsification with τ (and, hard, |delta|) held constant.");
}

}  // namespace

void register_kernelized(py::module_& m) {
    bind<float>(m, "f32");
    bind<double>(m, "f64");
}
