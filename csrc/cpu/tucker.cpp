// Fused Tucker kernels of the cpu backend (FLoRA). The weight is viewed as
// (d0, d1, sp): output channels, input channels, and every spatial mode flattened.
// The spatial modes are contracted into the core first (by the caller: a tensor of
// size r0·r1·sp, S = G ×_{k≥2} U_k), so that
//     ΔW[i0, i1, s] = scale · Σ_{a0,a1} U0[i0,a0] U1[i1,a1] S[a0,a1,s].
// Forward walks the rows i0 once and writes W0 + ΔW (or ΔW) with no full-size
// intermediate; backward walks Γ once and produces, in that one pass,
//     dU0 (per row), dU1 (per-thread sums) and Z = Γ ×_0 U0ᵀ ×_1 U1ᵀ (per-thread sums),
// from which the caller gets dG and the spatial dU_k by small contractions.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

struct TuckerShape {
    int64_t d0, d1, r0, r1, sp;
};

// T[a1][s] = Σ_a0 U0[i0, a0] S[a0, a1, s]: the core contracted with row i0 of U0,
// stored transposed (Tt[s][a1]) so that the output dot products run over contiguous a1.
template <typename T>
void row_core(const T* S, const T* u0_row, const TuckerShape& n, T* Tt) {
    std::fill(Tt, Tt + n.sp * n.r1, T(0));
    for (int64_t a0 = 0; a0 < n.r0; ++a0) {
        const T u = u0_row[a0];
        const T* S_a0 = S + a0 * n.r1 * n.sp;
        for (int64_t a1 = 0; a1 < n.r1; ++a1)
            for (int64_t s = 0; s < n.sp; ++s) Tt[s * n.r1 + a1] += u * S_a0[a1 * n.sp + s];
    }
}

template <typename T>
void forward(T* out, const T* weight, const T* S, const T* U0, const T* U1, TuckerShape n, double scale) {
    const T sc = static_cast<T>(scale);
#pragma omp parallel
    {
        std::vector<T> Tt(n.sp * n.r1);
#pragma omp for schedule(static)
        for (int64_t i0 = 0; i0 < n.d0; ++i0) {
            row_core(S, U0 + i0 * n.r0, n, Tt.data());
            const int64_t row = i0 * n.d1 * n.sp;
            for (int64_t i1 = 0; i1 < n.d1; ++i1) {
                const T* u1 = U1 + i1 * n.r1;
                for (int64_t s = 0; s < n.sp; ++s) {
                    const T* t = Tt.data() + s * n.r1;
                    T acc = 0;
#pragma omp simd reduction(+ : acc)
                    for (int64_t a1 = 0; a1 < n.r1; ++a1) acc += u1[a1] * t[a1];
                    const int64_t at = row + i1 * n.sp + s;
                    out[at] = (weight ? weight[at] : T(0)) + sc * acc;
                }
            }
        }
    }
}

template <typename T>
void backward(const T* grad, const T* S, const T* U0, const T* U1, TuckerShape n, double scale, T* Z, T* dU0,
              T* dU1) {
    const T sc = static_cast<T>(scale);
    const int64_t z_size = n.r0 * n.r1 * n.sp, du1_size = n.d1 * n.r1;
    std::memset(Z, 0, sizeof(T) * z_size);
    std::memset(dU1, 0, sizeof(T) * du1_size);
#pragma omp parallel
    {
        std::vector<T> Tt(n.sp * n.r1), Y(n.r1 * n.sp), Z_local(z_size, T(0)), dU1_local(du1_size, T(0));
#pragma omp for schedule(static)
        for (int64_t i0 = 0; i0 < n.d0; ++i0) {
            const T* g_row = grad + i0 * n.d1 * n.sp;
            const T* u0 = U0 + i0 * n.r0;
            row_core(S, u0, n, Tt.data());
            // Y[a1][s] = Σ_i1 U1[i1,a1] Γ[i0,i1,s];  dU1[i1,a1] += Σ_s Γ[i0,i1,s] T[a1][s]
            std::fill(Y.begin(), Y.end(), T(0));
            for (int64_t i1 = 0; i1 < n.d1; ++i1) {
                const T* g = g_row + i1 * n.sp;
                const T* u1 = U1 + i1 * n.r1;
                T* du1 = dU1_local.data() + i1 * n.r1;
                for (int64_t s = 0; s < n.sp; ++s) {
                    const T gs = g[s];
                    const T* t = Tt.data() + s * n.r1;
#pragma omp simd
                    for (int64_t a1 = 0; a1 < n.r1; ++a1) {
                        Y[a1 * n.sp + s] += u1[a1] * gs;
                        du1[a1] += gs * t[a1];
                    }
                }
            }
            // Z[a0,a1,s] += U0[i0,a0] Y[a1,s];  dU0[i0,a0] = scale Σ_{a1,s} Y[a1,s] S[a0,a1,s]
            for (int64_t a0 = 0; a0 < n.r0; ++a0) {
                const T u = u0[a0];
                const T* S_a0 = S + a0 * n.r1 * n.sp;
                T* Z_a0 = Z_local.data() + a0 * n.r1 * n.sp;
                T acc = 0;
#pragma omp simd reduction(+ : acc)
                for (int64_t j = 0; j < n.r1 * n.sp; ++j) {
                    Z_a0[j] += u * Y[j];
                    acc += Y[j] * S_a0[j];
                }
                dU0[i0 * n.r0 + a0] = sc * acc;
            }
        }
#pragma omp critical
        {
            for (int64_t j = 0; j < z_size; ++j) Z[j] += Z_local[j];
            for (int64_t j = 0; j < du1_size; ++j) dU1[j] += sc * dU1_local[j];
        }
    }
}

template <typename T>
T* ptr(std::uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

template <typename T>
void bind(py::module_& m, const char* suffix) {
    m.def((std::string("tucker_forward_") + suffix).c_str(),
          [](std::uintptr_t out, std::uintptr_t weight, std::uintptr_t S, std::uintptr_t U0, std::uintptr_t U1,
             int64_t d0, int64_t d1, int64_t r0, int64_t r1, int64_t sp, double scale) {
              py::gil_scoped_release release;
              forward<T>(ptr<T>(out), weight ? ptr<const T>(weight) : nullptr, ptr<const T>(S), ptr<const T>(U0),
                         ptr<const T>(U1), {d0, d1, r0, r1, sp}, scale);
          });
    m.def((std::string("tucker_backward_") + suffix).c_str(),
          [](std::uintptr_t grad, std::uintptr_t S, std::uintptr_t U0, std::uintptr_t U1, int64_t d0, int64_t d1,
             int64_t r0, int64_t r1, int64_t sp, double scale, std::uintptr_t Z, std::uintptr_t dU0,
             std::uintptr_t dU1) {
              py::gil_scoped_release release;
              backward<T>(ptr<const T>(grad), ptr<const T>(S), ptr<const T>(U0), ptr<const T>(U1),
                          {d0, d1, r0, r1, sp}, scale, ptr<T>(Z), ptr<T>(dU0), ptr<T>(dU1));
          });
}

}  // namespace

void register_tucker(py::module_& m) {
    bind<float>(m, "f32");
    bind<double>(m, "f64");
}
