// Row kernels for updates of the form ΔW = scale · U · R on a weight's matrix view
// (d0, n), with U (d0, r0) and R (r0, n) small in r0, and an epilogue per method
// (tensor_peft/lowrank.h): add for Tucker (FLoRA: U = U_0, R = G ×_{k≥1} U_k), exp and
// taylor1 for LieRA (U = B, R = A).
// Forward makes one pass over the rows of W0. Backward makes one pass over the rows of Γ:
// with D = ∂L/∂ΔW (Γ for add; Γ ⊙ W_eff, recomputed, for exp; Γ ⊙ W0 for taylor1) it gives
// dU = scale · D · Rᵀ and dR = scale · Uᵀ · D. Rows are split among OpenMP threads and
// walked in column chunks that keep R's slice in cache; backward's dR is summed per fixed
// chunk of rows and the chunks' partials added in chunk order (tensor_peft/threads.h).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "tensor_peft/arguments.h"
#include "tensor_peft/common.h"
#include "tensor_peft/huge_pages.h"
#include "tensor_peft/partial_sums.h"
#include "tensor_peft/lowrank.h"
#include "tensor_peft/threads.h"
#include "tensor_peft/vector_exp.h"

namespace py = pybind11;

namespace {

using tensor_peft::cpu::chunk_count, tensor_peft::cpu::chunk_range, tensor_peft::cpu::for_each_chunk;
using tensor_peft::cpu::fold_lanes, tensor_peft::cpu::kLanes, tensor_peft::cpu::vector_exp;
namespace arguments = tensor_peft::arguments;

using namespace tensor_peft::lowrank;  // Epilogue
constexpr int64_t kChunk = 512;  // columns per chunk: r0 slices of R stay in L1/L2

// acc[j] = scale · Σ_a u[a] R[a, start + j]: a chunk of one row of ΔW.
template <typename T>
inline __attribute__((always_inline)) void delta_chunk(T* acc, const T* u, const T* R, int64_t r0, int64_t n,
                                                       int64_t start, int64_t width, T scale) {
    for (int64_t j = 0; j < width; ++j) acc[j] = T(0);
    for (int64_t a = 0; a < r0; ++a) {
        const T coefficient = scale * u[a];
        const T* r = R + a * n + start;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) acc[j] += coefficient * r[j];
    }
}

template <typename T>
inline __attribute__((always_inline)) void forward_row(T* out, const T* w, const T* u, const T* R, int64_t r0,
                                                       int64_t n, T scale, int epilogue) {
    T acc[kChunk];
    for (int64_t start = 0; start < n; start += kChunk) {
        const int64_t width = std::min(kChunk, n - start);
        delta_chunk(acc, u, R, r0, n, start, width, scale);
        T* o = out + start;
        const T* wc = w ? w + start : nullptr;
        if (epilogue == kAdd) {
            for (int64_t j = 0; j < width; ++j) o[j] = wc ? wc[j] + acc[j] : acc[j];
        } else if (epilogue == kExp) {
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) o[j] = wc[j] * vector_exp(acc[j]);
        } else {
            for (int64_t j = 0; j < width; ++j) o[j] = wc[j] * (T(1) + acc[j]);
        }
    }
}

// One row of the backward: du[a] = scale · <D_row, R[a, :]> (its sum in lanes,
// tensor_peft/partial_sums.h), dR[a, :] += scale · u[a] · D_row.
template <typename T>
inline __attribute__((always_inline)) void backward_row(const T* g_row, const T* w, const T* u, const T* R,
                                                        int64_t r0, int64_t n, T scale, int epilogue, T* du, T* dR) {
    T d[kChunk];
    for (int64_t a = 0; a < r0; ++a) du[a] = T(0);
    for (int64_t start = 0; start < n; start += kChunk) {
        const int64_t width = std::min(kChunk, n - start);
        const T* g = g_row + start;
        if (epilogue == kAdd) {
            std::copy(g, g + width, d);
        } else if (epilogue == kExp) {
            delta_chunk(d, u, R, r0, n, start, width, scale);
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) d[j] = g[j] * w[start + j] * vector_exp(d[j]);
        } else {
            for (int64_t j = 0; j < width; ++j) d[j] = g[j] * w[start + j];
        }
        const int64_t whole = width - width % kLanes;
        for (int64_t a = 0; a < r0; ++a) {
            const T* r = R + a * n + start;
            T* dr = dR + a * n + start;
            const T coefficient = scale * u[a];
            T lanes[kLanes] = {};
            for (int64_t block = 0; block < whole; block += kLanes) {
#pragma omp simd
                for (int64_t l = 0; l < kLanes; ++l) {
                    lanes[l] += d[block + l] * r[block + l];
                    dr[block + l] += coefficient * d[block + l];
                }
            }
            T dot = fold_lanes(lanes);
            for (int64_t j = whole; j < width; ++j) {
                dot += d[j] * r[j];
                dr[j] += coefficient * d[j];
            }
            du[a] += scale * dot;
        }
    }
}

// The row functions are compiled once per instruction set (TP_CPU_CLONES); OpenMP's
// outlined regions are not, so the parallel loops below call into them per row.
TP_CPU_CLONES void row_forward(float* o, const float* w, const float* u, const float* R, int64_t r0, int64_t n,
                               float s, int e) {
    forward_row(o, w, u, R, r0, n, s, e);
}
TP_CPU_CLONES void row_forward(double* o, const double* w, const double* u, const double* R, int64_t r0, int64_t n,
                               double s, int e) {
    forward_row(o, w, u, R, r0, n, s, e);
}
TP_CPU_CLONES void row_backward(const float* g, const float* w, const float* u, const float* R, int64_t r0, int64_t n,
                                float s, int e, float* du, float* dR) {
    backward_row(g, w, u, R, r0, n, s, e, du, dR);
}
TP_CPU_CLONES void row_backward(const double* g, const double* w, const double* u, const double* R, int64_t r0,
                                int64_t n, double s, int e, double* du, double* dR) {
    backward_row(g, w, u, R, r0, n, s, e, du, dR);
}

template <typename T>
void forward(T* out, const T* weight, const T* U, const T* R, int64_t d0, int64_t r0, int64_t n, T scale,
             int epilogue) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < d0; ++i)
        row_forward(out + i * n, weight ? weight + i * n : nullptr, U + i * r0, R, r0, n, scale, epilogue);
}

// Multiply-adds a backward chunk of rows takes at least (fewer, larger chunks on small
// problems): 32 rows of rank 8 and 4096 columns, so that a call on a block of rows (as
// hadamard_linear makes) sums few r0×n partials for the work it does.
constexpr int64_t kChunkWork = 1 << 20;

template <typename T>
void backward(const T* grad, const T* weight, const T* U, const T* R, int64_t d0, int64_t r0, int64_t n, T scale,
              int epilogue, T* dU, T* dR) {
    const int64_t size = r0 * n;
    const int64_t chunks = chunk_count(d0, std::max<int64_t>(1, kChunkWork / std::max<int64_t>(1, size)));
    std::fill(dR, dR + size, T(0));
    std::vector<T> partials(std::max<int64_t>(chunks - 1, 0) * size, T(0));  // chunk 0 sums into dR
    for_each_chunk(chunks, [&](int64_t c) {
        int64_t begin, end;
        chunk_range(d0, chunks, c, begin, end);
        T* sum = c == 0 ? dR : partials.data() + (c - 1) * size;
        for (int64_t i = begin; i < end; ++i)
            row_backward(grad + i * n, weight ? weight + i * n : nullptr, U + i * r0, R, r0, n, scale, epilogue,
                         dU + i * r0, sum);
    });
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t j = 0; j < size; ++j)
        for (int64_t c = 1; c < chunks; ++c) dR[j] += partials[(c - 1) * size + j];
}

// The arguments both kernels share, checked: sizes, the epilogue, and W0 (null only for add).
struct Shape {
    int64_t d0, r0, n;
    int epilogue;
};

inline Shape checked_shape(std::uintptr_t weight, int64_t d0, int64_t r0, int64_t n, int64_t epilogue) {
    Shape shape{arguments::size(d0, "d0"), arguments::size(r0, "r0"), arguments::size(n, "n"),
                arguments::choice(epilogue, kAdd, kTaylor1, "epilogue")};
    arguments::product(d0, std::max(n, r0), "d0 × max(n, r0)");
    arguments::product(r0, n, "r0 × n");
    if (weight == 0 && shape.epilogue != kAdd && d0 * n > 0)
        throw pybind11::value_error("weight is a null pointer, but the exp and taylor1 epilogues read W0");
    return shape;
}

template <typename T>
void bind(py::module_& m, const std::string& suffix) {
    using arguments::pointer;
    m.def(("lowrank_forward_" + suffix).c_str(),
          [](std::uintptr_t out, std::uintptr_t weight, std::uintptr_t U, std::uintptr_t R, int64_t d0, int64_t r0,
             int64_t n, double scale, int64_t epilogue) {
              const Shape s = checked_shape(weight, d0, r0, n, epilogue);
              T* o = pointer<T>(out, s.d0 * s.n, "out");
              const T* w = weight ? pointer<const T>(weight, s.d0 * s.n, "weight") : nullptr;
              const T* u = pointer<const T>(U, s.d0 * s.r0, "U");
              const T* r = pointer<const T>(R, s.r0 * s.n, "R");
              py::gil_scoped_release release;
              tensor_peft::cpu::advise_huge_pages(o, s.d0 * s.n * sizeof(T));
              forward<T>(o, w, u, r, s.d0, s.r0, s.n, static_cast<T>(scale), s.epilogue);
          },
          py::arg("out"), py::arg("weight"), py::arg("U"), py::arg("R"), py::arg("d0"), py::arg("r0"),
          py::arg("n"), py::arg("scale"), py::arg("epilogue"),
          "out (d0, n) from W0 and ΔW = scale·U·R by the epilogue (0 add, 1 exp, 2 taylor1; W0 0: ΔW).");
    m.def(("lowrank_backward_" + suffix).c_str(),
          [](std::uintptr_t grad, std::uintptr_t weight, std::uintptr_t U, std::uintptr_t R, int64_t d0, int64_t r0,
             int64_t n, double scale, int64_t epilogue, std::uintptr_t dU, std::uintptr_t dR) {
              const Shape s = checked_shape(weight, d0, r0, n, epilogue);
              const T* g = pointer<const T>(grad, s.d0 * s.n, "grad");
              const T* w = weight ? pointer<const T>(weight, s.d0 * s.n, "weight") : nullptr;
              const T* u = pointer<const T>(U, s.d0 * s.r0, "U");
              const T* r = pointer<const T>(R, s.r0 * s.n, "R");
              T* du = pointer<T>(dU, s.d0 * s.r0, "dU");
              T* dr = pointer<T>(dR, s.r0 * s.n, "dR");
              py::gil_scoped_release release;
              backward<T>(g, w, u, r, s.d0, s.r0, s.n, static_cast<T>(scale), s.epilogue, du, dr);
          },
          py::arg("grad"), py::arg("weight"), py::arg("U"), py::arg("R"), py::arg("d0"), py::arg("r0"),
          py::arg("n"), py::arg("scale"), py::arg("epilogue"), py::arg("dU"), py::arg("dR"),
          "dU = scale·D·Rᵀ and dR = scale·Uᵀ·D with D = ∂L/∂ΔW from Γ by the epilogue, one pass over Γ.");
}

}  // namespace

void register_lowrank(py::module_& m) {
    bind<float>(m, "f32");
    bind<double>(m, "f64");
}
