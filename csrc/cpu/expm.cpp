// Batched matrix exponential and its adjoint Fréchet derivative (the backward of exp):
// the batch is cut into fixed chunks (tensor_peft/threads.h), each run with its own
// workspace through the math of tensor_peft/expm.h in the data's own precision (with that
// precision's θ_m). Chunks start at multiples of the SIMD lane count, so the lane groups,
// which share a Padé degree, are the same at any thread count.
//   forward   out[b] = exp(A[b])
//   backward  dA[b] = L(A[b]ᵀ, Γ[b]), Γ scaled by a power of two to ‖Γ‖₁ ≤ 1 first and the
//             result scaled back (exact): a large gradient costs no extra squarings.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "tensor_peft/arguments.h"
#include "tensor_peft/common.h"
#include "tensor_peft/expm.h"
#include "tensor_peft/lanes.h"
#include "tensor_peft/threads.h"


namespace py = pybind11;
namespace arguments = tensor_peft::arguments;

namespace {

using tensor_peft::cpu::aligned_buffer;
using tensor_peft::cpu::chunk_count, tensor_peft::cpu::chunk_range, tensor_peft::cpu::for_each_chunk;
using tensor_peft::expm::exp_and_frechet;
using tensor_peft::expm::Lanes;
using tensor_peft::expm::workspace_size;

// How a thread holds the values of its matrices: for a compile-time size N, SIMD vectors
// with one matrix per lane; for a run-time size, the data type S, one matrix at a time.
template <int N, typename S>
using Value = std::conditional_t<(N > 0), tensor_peft::cpu::Vector<S>, S>;

// values[e] lane l = in[l·nn + e] for the first `lanes` matrices of `in`, zeros past them.
template <typename V, typename S>
inline void gather(const S* in, V* values, int64_t lanes, int64_t nn) {
    for (int64_t e = 0; e < nn; ++e) {
        V value = V{};
        for (int l = 0; l < lanes; ++l) Lanes<V>::set_lane(value, l, in[l * nn + e]);
        values[e] = value;
    }
}

// out[l·nn + e] = values[e] lane l for the first `lanes` matrices.
template <typename V, typename S>
inline void scatter(const V* values, S* out, int64_t lanes, int64_t nn) {
    for (int64_t e = 0; e < nn; ++e) {
        const V value = values[e];
        for (int l = 0; l < lanes; ++l) out[l * nn + e] = Lanes<V>::lane(value, l);
    }
}

// Each chunk of the batch runs, Lanes<V>::count matrices at a time, through
// one call of these range functions, compiled once per instruction set (TP_CPU_CLONES)
// and per small size N (N = 0: any n). Lanes past the end of the chunk hold zeros.
template <int N, typename S, typename V = Value<N, S>>
TP_CPU_CLONES void forward_range(const S* A, S* out, int64_t begin, int64_t end, int n, V* work,
                                 typename Lanes<V>::Index* pivots) {
    const int64_t nn = static_cast<int64_t>(n) * n;
    V* X = work + workspace_size(n);
    V* exp_X = X + nn;
    for (int64_t b = begin; b < end; b += Lanes<V>::count) {
        const int64_t lanes = std::min<int64_t>(Lanes<V>::count, end - b);
        gather(A + b * nn, X, lanes, nn);
        exp_and_frechet<V, N>(X, nullptr, exp_X, nullptr, n, work, pivots);
        scatter(exp_X, out + b * nn, lanes, nn);
    }
}

template <int N, typename S, typename V = Value<N, S>>
TP_CPU_CLONES void backward_range(const S* grad, const S* A, S* dA, int64_t begin, int64_t end, int n, V* work,
                                  typename Lanes<V>::Index* pivots) {
    using Lane = Lanes<V>;
    const int64_t nn = static_cast<int64_t>(n) * n;
    V* X = work + workspace_size(n);  // Aᵀ
    V* E = X + nn;                    // c·Γ
    V* exp_X = E + nn;
    V* d = exp_X + nn;
    for (int64_t b = begin; b < end; b += Lane::count) {
        const int64_t lanes = std::min<int64_t>(Lane::count, end - b);
        V down = Lane::broadcast(S(1)), up = down;
        for (int l = 0; l < lanes; ++l) {
            const int shift = tensor_peft::expm::gradient_shift(grad + (b + l) * nn, n);
            Lane::set_lane(down, l, std::ldexp(S(1), -shift));
            Lane::set_lane(up, l, std::ldexp(S(1), shift));
        }
        gather(A + b * nn, X, lanes, nn);
        for (int i = 0; i < n; ++i)
            for (int j = 0; j < i; ++j) std::swap(X[i * n + j], X[j * n + i]);
        gather(grad + b * nn, E, lanes, nn);
        for (int64_t e = 0; e < nn; ++e) E[e] *= down;
        exp_and_frechet<V, N>(X, E, exp_X, d, n, work, pivots);
        for (int64_t e = 0; e < nn; ++e) d[e] *= up;
        scatter(d, dA + b * nn, lanes, nn);
    }
}

// body(begin, end) for the fixed chunks of the batch, each starting at a multiple of
// `group` matrices (the lane count: lane groups are then the same at any thread count).
template <typename Body>
void for_each_batch_chunk(int64_t batch, int64_t group, Body body) {
    const int64_t groups = (batch + group - 1) / group;
    const int64_t chunks = chunk_count(groups, 1);
    for_each_chunk(chunks, [&](int64_t c) {
        int64_t first, last;
        chunk_range(groups, chunks, c, first, last);
        body(first * group, std::min(last * group, batch));
    });
}

template <int N>
struct Forward {
    template <typename S>
    static void run(const S* A, S* out, int64_t batch, int n) {
        using V = Value<N, S>;
        for_each_batch_chunk(batch, Lanes<V>::count, [&](int64_t begin, int64_t end) {
            const auto work = aligned_buffer<V>(workspace_size(n) + 2 * int64_t(n) * n);
            const auto pivots = aligned_buffer<typename Lanes<V>::Index>(n);
            forward_range<N, S>(A, out, begin, end, n, work.get(), pivots.get());
        });
    }
};

template <int N>
struct Backward {
    template <typename S>
    static void run(const S* grad, const S* A, S* dA, int64_t batch, int n) {
        using V = Value<N, S>;
        for_each_batch_chunk(batch, Lanes<V>::count, [&](int64_t begin, int64_t end) {
            const auto work = aligned_buffer<V>(workspace_size(n) + 4 * int64_t(n) * n);
            const auto pivots = aligned_buffer<typename Lanes<V>::Index>(n);
            backward_range<N, S>(grad, A, dA, begin, end, n, work.get(), pivots.get());
        });
    }
};

// The largest n: the kernels index a matrix's n² entries with int.
constexpr int64_t kMaxSize = 46340;

// (batch, n) checked, and the number of values of the batch.
inline int64_t checked_values(int64_t batch, int64_t n) {
    arguments::at_most(arguments::size(n, "n"), kMaxSize, "n");
    return arguments::product(arguments::size(batch, "batch"), n * n, "batch × n²");
}

template <typename S>
void bind(py::module_& m, const std::string& suffix) {
    using arguments::pointer;
    m.def(("matrix_exp_" + suffix).c_str(),
          [](std::uintptr_t out, std::uintptr_t A, int64_t batch, int64_t n) {
              const int64_t values = checked_values(batch, n);
              S* o = pointer<S>(out, values, "out");
              const S* a = pointer<const S>(A, values, "A");
              py::gil_scoped_release release;
              tensor_peft::expm::with_size<Forward>(static_cast<int>(n), a, o, batch, static_cast<int>(n));
          },
          py::arg("out"), py::arg("A"), py::arg("batch"), py::arg("n"),
          "out[b] = exp(A[b]) for a contiguous batch of n×n matrices.");
    m.def(("matrix_exp_backward_" + suffix).c_str(),
          [](std::uintptr_t d_A, std::uintptr_t grad, std::uintptr_t A, int64_t batch, int64_t n) {
              const int64_t values = checked_values(batch, n);
              S* d = pointer<S>(d_A, values, "d_A");
              const S* g = pointer<const S>(grad, values, "grad");
              const S* a = pointer<const S>(A, values, "A");
              py::gil_scoped_release release;
              tensor_peft::expm::with_size<Backward>(static_cast<int>(n), g, a, d, batch, static_cast<int>(n));
          },
          py::arg("d_A"), py::arg("grad"), py::arg("A"), py::arg("batch"), py::arg("n"),
          "d_A[b] = L(A[b]ᵀ, grad[b]), the adjoint Fréchet derivative of exp.");
}

}  // namespace

void register_expm(py::module_& m) {
    bind<float>(m, "f32");
    bind<double>(m, "f64");
}
