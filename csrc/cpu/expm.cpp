// Batched matrix exponential and its adjoint Fréchet derivative (the backward of exp):
// each OpenMP thread takes a static share of the batch with its own workspace and runs
// the math of tensor_peft/expm.h in the data's own precision (with that precision's θ_m).
//   forward   out[b] = exp(A[b])
//   backward  dA[b] = L(A[b]ᵀ, Γ[b]), Γ scaled by a power of two to ‖Γ‖₁ ≤ 1 first and the
//             result scaled back (exact): a large gradient costs no extra squarings.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "tensor_peft/common.h"
#include "tensor_peft/expm.h"
#include "tensor_peft/threads.h"


namespace py = pybind11;

namespace {

using tensor_peft::cpu::share;

// Each thread runs its share of the batch through one call of these range functions,
// compiled once per instruction set (TP_CPU_CLONES) and per small size N (N = 0: any n).
template <int N, typename S>
TP_CPU_CLONES void forward_range(const S* A, S* out, int64_t begin, int64_t end, int n, S* work, int* pivots) {
    const int64_t nn = static_cast<int64_t>(n) * n;
    for (int64_t b = begin; b < end; ++b)
        tensor_peft::expm::exp_and_frechet<S, S, N>(A + b * nn, nullptr, out + b * nn, nullptr, n, work, pivots);
}

template <int N, typename S>
TP_CPU_CLONES void backward_range(const S* grad, const S* A, S* dA, int64_t begin, int64_t end, int n, S* work,
                                  int* pivots) {
    const int64_t nn = static_cast<int64_t>(n) * n;
    S* X = work + tensor_peft::expm::workspace_size(n);  // Aᵀ
    S* E = X + nn;                                        // c·Γ
    S* exp_X = E + nn;
    for (int64_t b = begin; b < end; ++b) {
        const S* g = grad + b * nn;
        const S* a = A + b * nn;
        double norm = 0;
        for (int j = 0; j < n; ++j) {
            double column = 0;
            for (int i = 0; i < n; ++i) column += std::fabs(static_cast<double>(g[i * n + j]));
            norm = column > norm || column != column ? column : norm;
        }
        const int shift = norm > 1 ? static_cast<int>(std::ceil(std::log2(norm))) : 0;
        const S down = std::ldexp(S(1), -shift), up = std::ldexp(S(1), shift);  // powers of two: exact
        for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j) {
                X[i * n + j] = a[j * n + i];
                E[i * n + j] = down * g[i * n + j];
            }
        S* d = dA + b * nn;
        tensor_peft::expm::exp_and_frechet<S, S, N>(X, E, exp_X, d, n, work, pivots);
        for (int64_t i = 0; i < nn; ++i) d[i] *= up;
    }
}

template <int N>
struct Forward {
    template <typename S>
    static void run(const S* A, S* out, int64_t begin, int64_t end, int n, S* work, int* pivots) {
        forward_range<N, S>(A, out, begin, end, n, work, pivots);
    }
};

template <int N>
struct Backward {
    template <typename S>
    static void run(const S* grad, const S* A, S* dA, int64_t begin, int64_t end, int n, S* work, int* pivots) {
        backward_range<N, S>(grad, A, dA, begin, end, n, work, pivots);
    }
};

template <typename S>
void forward(const S* A, S* out, int64_t batch, int n) {
#pragma omp parallel
    {
        std::vector<S> work(tensor_peft::expm::workspace_size(n));
        std::vector<int> pivots(n);
        int64_t begin, end;
        share(batch, begin, end);
        tensor_peft::expm::with_size<Forward>(n, A, out, begin, end, n, work.data(), pivots.data());
    }
}

template <typename S>
void backward(const S* grad, const S* A, S* dA, int64_t batch, int n) {
    const int64_t nn = static_cast<int64_t>(n) * n;
#pragma omp parallel
    {
        std::vector<S> work(tensor_peft::expm::workspace_size(n) + 3 * nn);
        std::vector<int> pivots(n);
        int64_t begin, end;
        share(batch, begin, end);
        tensor_peft::expm::with_size<Backward>(n, grad, A, dA, begin, end, n, work.data(), pivots.data());
    }
}

template <typename S>
S* ptr(std::uintptr_t address) {
    return reinterpret_cast<S*>(address);
}

template <typename S>
void bind(py::module_& m, const std::string& suffix) {
    m.def(("matrix_exp_" + suffix).c_str(),
          [](std::uintptr_t out, std::uintptr_t A, int64_t batch, int n) {
              py::gil_scoped_release release;
              forward<S>(ptr<const S>(A), ptr<S>(out), batch, n);
          },
          "out[b] = exp(A[b]) for a contiguous batch of n×n matrices.");
    m.def(("matrix_exp_backward_" + suffix).c_str(),
          [](std::uintptr_t d_A, std::uintptr_t grad, std::uintptr_t A, int64_t batch, int n) {
              py::gil_scoped_release release;
              backward<S>(ptr<const S>(grad), ptr<const S>(A), ptr<S>(d_A), batch, n);
          },
          "d_A[b] = L(A[b]ᵀ, grad[b]), the adjoint Fréchet derivative of exp.");
}

}  // namespace

void register_expm(py::module_& m) {
    bind<float>(m, "f32");
    bind<double>(m, "f64");
}
