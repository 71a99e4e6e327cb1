// Fused Tucker kernels of the cpu backend (FLoRA). The weight is viewed as a matrix
// (d0, n): output channels by everything else. Every mode but the first is contracted
// into the core by the caller, R = G ×_1 U_1 ×_2 U_2 … (r0, n), a tensor no larger than
// the weight (r0 ≤ d0), so that ΔW = scale · U0 · R. Then:
//   forward   out = W0 + scale · U0 · R (or ΔW alone), one pass over the rows of W0;
//   backward  dU0 = scale · Γ · Rᵀ and dR = scale · U0ᵀ · Γ, one pass over the rows of Γ;
// the caller gets dG and the other dU_k from dR by small contractions. Rows are split
// among OpenMP threads and walked in chunks that keep R's slice in cache.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "tensor_peft/common.h"

namespace py = pybind11;

namespace {

constexpr int64_t kChunk = 512;  // columns per chunk: r0 slices of R stay in L1/L2

// One row of the forward: out_row = w_row + scale · Σ_a0 u0[a0] R[a0, :] (w_row may be null).
template <typename T>
inline __attribute__((always_inline)) void forward_row(T* out_row, const T* w_row, const T* u0, const T* R,
                                                       int64_t r0, int64_t n, T scale) {
    T acc[kChunk];
    for (int64_t start = 0; start < n; start += kChunk) {
        const int64_t width = std::min(kChunk, n - start);
        for (int64_t j = 0; j < width; ++j) acc[j] = w_row ? w_row[start + j] : T(0);
        for (int64_t a0 = 0; a0 < r0; ++a0) {
            const T u = scale * u0[a0];
            const T* r = R + a0 * n + start;
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) acc[j] += u * r[j];
        }
        std::copy(acc, acc + width, out_row + start);
    }
}

// One row of the backward: du0[a0] = scale · <g_row, R[a0, :]>, dR[a0, :] += u0[a0] · g_row.
template <typename T>
inline __attribute__((always_inline)) void backward_row(const T* g_row, const T* u0, const T* R, int64_t r0,
                                                        int64_t n, T scale, T* du0, T* dR) {
    for (int64_t a0 = 0; a0 < r0; ++a0) du0[a0] = T(0);
    for (int64_t start = 0; start < n; start += kChunk) {
        const int64_t width = std::min(kChunk, n - start);
        const T* g = g_row + start;
        for (int64_t a0 = 0; a0 < r0; ++a0) {
            const T* r = R + a0 * n + start;
            T* dr = dR + a0 * n + start;
            const T u = u0[a0];
            T dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < width; ++j) {
                dot += g[j] * r[j];
                dr[j] += u * g[j];
            }
            du0[a0] += scale * dot;
        }
    }
}

// The row functions are compiled once per instruction set (TP_CPU_CLONES); OpenMP's
// outlined regions are not, so the parallel loops below call into them per row.
TP_CPU_CLONES void row_forward(float* o, const float* w, const float* u, const float* R, int64_t r0, int64_t n,
                               float s) {
    forward_row(o, w, u, R, r0, n, s);
}
TP_CPU_CLONES void row_forward(double* o, const double* w, const double* u, const double* R, int64_t r0, int64_t n,
                               double s) {
    forward_row(o, w, u, R, r0, n, s);
}
TP_CPU_CLONES void row_backward(const float* g, const float* u, const float* R, int64_t r0, int64_t n, float s,
                                float* du, float* dR) {
    backward_row(g, u, R, r0, n, s, du, dR);
}
TP_CPU_CLONES void row_backward(const double* g, const double* u, const double* R, int64_t r0, int64_t n, double s,
                                double* du, double* dR) {
    backward_row(g, u, R, r0, n, s, du, dR);
}

template <typename T>
void forward(T* out, const T* weight, const T* U0, const T* R, int64_t d0, int64_t r0, int64_t n, T scale) {
#pragma omp parallel for schedule(static)
    for (int64_t i0 = 0; i0 < d0; ++i0)
        row_forward(out + i0 * n, weight ? weight + i0 * n : nullptr, U0 + i0 * r0, R, r0, n, scale);
}

template <typename T>
void backward(const T* grad, const T* U0, const T* R, int64_t d0, int64_t r0, int64_t n, T scale, T* dU0,
              T* dR) {
    std::fill(dR, dR + r0 * n, T(0));
#pragma omp parallel
    {
        std::vector<T> dR_local(r0 * n, T(0));
#pragma omp for schedule(static)
        for (int64_t i0 = 0; i0 < d0; ++i0)
            row_backward(grad + i0 * n, U0 + i0 * r0, R, r0, n, scale, dU0 + i0 * r0, dR_local.data());
#pragma omp critical
        for (int64_t j = 0; j < r0 * n; ++j) dR[j] += scale * dR_local[j];
    }
}

template <typename T>
T* ptr(std::uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

template <typename T>
void bind(py::module_& m, const std::string& suffix) {
    m.def(("tucker_forward_" + suffix).c_str(),
          [](std::uintptr_t out, std::uintptr_t weight, std::uintptr_t U0, std::uintptr_t R, int64_t d0, int64_t r0,
             int64_t n, double scale) {
              py::gil_scoped_release release;
              forward<T>(ptr<T>(out), weight ? ptr<const T>(weight) : nullptr, ptr<const T>(U0), ptr<const T>(R),
                         d0, r0, n, static_cast<T>(scale));
          },
          "out (d0, n) = weight + scale·U0·R (weight 0: ΔW alone).");
    m.def(("tucker_backward_" + suffix).c_str(),
          [](std::uintptr_t grad, std::uintptr_t U0, std::uintptr_t R, int64_t d0, int64_t r0, int64_t n,
             double scale, std::uintptr_t dU0, std::uintptr_t dR) {
              py::gil_scoped_release release;
              backward<T>(ptr<const T>(grad), ptr<const T>(U0), ptr<const T>(R), d0, r0, n, static_cast<T>(scale),
                          ptr<T>(dU0), ptr<T>(dR));
          },
          "dU0 = scale·Γ·Rᵀ and dR = scale·U0ᵀ·Γ in one pass over Γ (d0, n).");
}

}  // namespace

void register_tucker(py::module_& m) {
    bind<float>(m, "f32");
    bind<double>(m, "f64");
}
