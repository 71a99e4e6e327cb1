// SNELL's rows on the CPU: ΔW_raw[j, i] = κ(b_j, a_i) for the m rows of Out (H, m, p) and
// the n columns of In, passed transposed as (H, p, n) so that each row j is computed for
// all i at once with unit-stride loops; each entry's κ and gradient are those of
// tensor_peft/kernelized.h. Mixture P + alpha·softmax_j(P/gamma) + beta: the softmax runs
// down each column, its max and sum (n values each) come from one pass making P's rows
// (mixture_statistics), and each row's E = exp((P − max_j P)/gamma), S = E/Σ is made with
// the row: nothing m×n is held. The difference is taken before the division, which keeps a
// small gamma from magnifying the rounding of P/gamma.
// Included by csrc/cpu/kernelized.cpp alone: its contents are in an anonymous namespace,
// as they were in that one translation unit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "tensor_peft/common.h"
#include "tensor_peft/huge_pages.h"
#include "tensor_peft/kernelized.h"
#include "tensor_peft/threads.h"
#include "tensor_peft/vector_exp.h"

namespace {

using namespace tensor_peft::kernelized;  // ids, κ and its gradient per entry, mask_factor
using tensor_peft::cpu::chunk_count, tensor_peft::cpu::chunk_range, tensor_peft::cpu::for_each_chunk;
using tensor_peft::cpu::vector_exp;

template <typename T>
struct Problem {
    const T* out_emb;  // (H, m, p)
    const T* in_t;     // (H, p, n)
    int64_t m, n, chunks, width;
    int kernel;
    const T* coeff;   // (H,)
    T alpha, beta, gamma, eps;
    const T* column_max = nullptr;  // mixture: max_j P and Σ_j exp((P − max)/gamma) per column
    const T* column_sum = nullptr;
};

// A chunk's row buffers of n values (mixture's softmax row S in `soft`), and piecewise's
// roots sqrt(‖b^h − a^h‖² + eps) of a row for every chunk h (H·n values, chunk h at h·n).
template <typename T>
struct Rows {
    std::vector<T> distance, scratch, piecewise, soft, roots;
    Rows(int64_t n, int64_t chunks) : distance(n), scratch(n), piecewise(n), soft(n), roots(n * chunks) {}
};

// distance[i] = ‖b_j^h − a_i^h‖² for chunk h.
template <typename T>
inline void squared_distances(const Problem<T>& P, int64_t j, int64_t h, T* distance) {
    const int64_t n = P.n;
    for (int64_t i = 0; i < n; ++i) distance[i] = T(0);
    const T* b = P.out_emb + (h * P.m + j) * P.width;
    for (int64_t d = 0; d < P.width; ++d) {
        const T bd = b[d];
        const T* a = P.in_t + (h * P.width + d) * n;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) distance[i] += (bd - a[i]) * (bd - a[i]);
    }
}

// out[i] = b_j·a_i, the dot product over every chunk.
template <typename T>
inline void dots(const Problem<T>& P, int64_t j, T* out) {
    const int64_t n = P.n;
    for (int64_t i = 0; i < n; ++i) out[i] = T(0);
    for (int64_t h = 0; h < P.chunks; ++h) {
        const T* b = P.out_emb + (h * P.m + j) * P.width;
        for (int64_t d = 0; d < P.width; ++d) {
            const T bd = b[d];
            const T* a = P.in_t + (h * P.width + d) * n;
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) out[i] += bd * a[i];
        }
    }
}

// Chunk h's roots of row j, sqrt(‖b_j^h − a_i^h‖² + eps), into root, and piecewise[i] +=
// coeff[h]·root[i], for a chunk width known at compile time: each entry's sum of squares
// stays in a register (about twice as fast as summing into a row buffer). It adds the
// same terms in the same order as squared_distances: the same bits.
template <int Width, typename T>
inline void piecewise_chunk(const Problem<T>& P, int64_t j, int64_t h, T* piecewise, T* root) {
    const int64_t n = P.n;
    const T* b = P.out_emb + (h * P.m + j) * Width;
    const T* a = P.in_t + h * Width * n;
    T coordinate[Width];
    for (int d = 0; d < Width; ++d) coordinate[d] = b[d];
    const T c = P.coeff[h], eps = P.eps;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        T squares = T(0);
        for (int d = 0; d < Width; ++d) squares += (coordinate[d] - a[d * n + i]) * (coordinate[d] - a[d * n + i]);
        root[i] = piecewise_root(squares, eps);
        piecewise[i] += c * root[i];
    }
}

// piecewise[i] = Σ_h coeff[h]·sqrt(‖b_j^h − a_i^h‖² + eps), the roots kept in `roots`
// (H·n values, chunk h at h·n) for the backward; chunk widths 1, 2, 4, 8, 16 by piecewise_chunk.
// Never inlined: every pass (mixture's column maxima and sums, ΔW's rows, the backward)
// gets P from this one compiled code, so P − max_j P is exactly 0 at the maximum and the
// same everywhere (code inlined into different callers may contract a·b + c into an FMA
// differently, and the softmax magnifies a difference of one rounding by 1/gamma).
template <typename T>
TP_CPU_CLONES __attribute__((noinline)) void piecewise_row(const Problem<T>& P, int64_t j, T* piecewise, T* roots,
                                                           Rows<T>& rows) {
    const int64_t n = P.n;
    T* distance = rows.distance.data();
    for (int64_t i = 0; i < n; ++i) piecewise[i] = T(0);
    for (int64_t h = 0; h < P.chunks; ++h) {
        T* root = roots + h * n;
        switch (P.width) {
            case 1: piecewise_chunk<1>(P, j, h, piecewise, root); continue;
            case 2: piecewise_chunk<2>(P, j, h, piecewise, root); continue;
            case 4: piecewise_chunk<4>(P, j, h, piecewise, root); continue;
            case 8: piecewise_chunk<8>(P, j, h, piecewise, root); continue;
            case 16: piecewise_chunk<16>(P, j, h, piecewise, root); continue;
            default: break;
        }
        squared_distances(P, j, h, distance);
        const T c = P.coeff[h];
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            root[i] = piecewise_root(distance[i], P.eps);
            piecewise[i] += c * root[i];
        }
    }
}

// Mixture's row of ΔW_raw from P's row, in place: row[i] = mixture_value(P, S), with
// S = softmax_j(P/gamma) = E/Σ_j E into `soft`, E = exp((P − max_j P)/gamma) from the
// column statistics. Never inlined, like piecewise_row: the forward and the backward's
// masks get the same bits.
template <typename T>
TP_CPU_CLONES __attribute__((noinline)) void add_softmax_terms(const Problem<T>& P, T* row, T* soft) {
    const T *max = P.column_max, *sum = P.column_sum;
    const T alpha = P.alpha, beta = P.beta, gamma = P.gamma;
    const int64_t n = P.n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        soft[i] = vector_exp(softmax_exponent(row[i], max[i], gamma)) / sum[i];
        row[i] = mixture_value(row[i], soft[i], alpha, beta);
    }
}

// Multiply-adds a chunk of rows takes at least (fewer, larger chunks on small problems).
constexpr int64_t kChunkWork = 1 << 16;

// The number of fixed chunks the m rows are cut into.
template <typename T>
int64_t row_chunks(const Problem<T>& P) {
    const int64_t row_work = std::max<int64_t>(1, P.n * std::max<int64_t>(1, P.chunks * P.width));
    return chunk_count(P.m, std::max<int64_t>(1, kChunkWork / row_work));
}

// body(c, begin, end) for the fixed chunks of rows, on the OpenMP threads.
template <typename T, typename Body>
void for_each_row_chunk(const Problem<T>& P, int64_t chunks, Body body) {
    for_each_chunk(chunks, [&](int64_t c) {
        int64_t begin, end;
        chunk_range(P.m, chunks, c, begin, end);
        body(c, begin, end);
    });
}

// x of row j into out (kernels not built on P): ‖b_j − a_i‖² or b_j·a_i for every i.
template <typename T>
inline void reductions(const Problem<T>& P, int64_t j, T* out, Rows<T>& rows) {
    if (is_dot_product(P.kernel)) {
        dots(P, j, out);
        return;
    }
    const int64_t n = P.n;
    T* distance = rows.distance.data();
    for (int64_t i = 0; i < n; ++i) out[i] = T(0);
    for (int64_t h = 0; h < P.chunks; ++h) {
        squared_distances(P, j, h, distance);
        for (int64_t i = 0; i < n; ++i) out[i] += distance[i];
    }
}

// Row j of ΔW_raw into out (mixture: its S row into rows.soft, from the column statistics).
template <typename T>
TP_CPU_CLONES void raw_row(const Problem<T>& P, int64_t j, T* out, Rows<T>& rows) {
    if (is_piecewise(P.kernel)) {
        piecewise_row(P, j, out, rows.roots.data(), rows);
        if (P.kernel == kMixture) add_softmax_terms(P, out, rows.soft.data());
        return;
    }
    reductions(P, j, out, rows);
    with_kernel(P.kernel, [&](auto kernel) {
        for (int64_t i = 0; i < P.n; ++i) out[i] = value<T>(kernel, out[i], P.alpha, P.beta, P.gamma);
    });
}

// local[i] += exp((P − column_max)/gamma) of P's row (summed in double), E as add_softmax_terms
// makes it. vector_exp is plain arithmetic: the loop vectorizes with P's members held in
// locals (read through P, they could alias the stores).
template <typename T>
TP_CPU_CLONES void exp_terms(const Problem<T>& P, const T* piecewise, const T* column_max, double* local) {
    const T gamma = P.gamma;
    const int64_t n = P.n;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) local[i] += vector_exp(softmax_exponent(piecewise[i], column_max[i], gamma));
}

// Rows per chunk of mixture_statistics: fixed, so that a column's statistics are the same bits
// whatever columns are computed with it (a caller working in column blocks).
constexpr int64_t kStatisticsRows = 64;

// Mixture's column statistics, max_j P and Σ_j exp((P − max_j P)/gamma), in one pass making
// P's rows: each chunk of kStatisticsRows rows holds its rows (kStatisticsRows × n), takes
// their column maxima M_c, then sums exp((P − M_c)/gamma) over them (in double); the chunks
// combine in chunk order, max_j P = max_c M_c and Σ_j = Σ_c sum_c·exp((M_c − max_j P)/gamma)
// (a factor ≤ 1: nothing overflows). Given `p_rows` (m, n), P's rows are left there (a
// later pass reads them instead of making P again); else nothing m×n is held.
template <typename T>
void mixture_statistics(const Problem<T>& P, T* column_max, T* column_sum, T* p_rows) {
    const int64_t n = P.n, chunks = chunk_count(P.m, kStatisticsRows);
    std::vector<T> maxima(chunks * n, -std::numeric_limits<T>::infinity());
    std::vector<double> sums(chunks * n, 0.0);
    for_each_chunk(chunks, [&](int64_t c) {
        int64_t begin, end;
        chunk_range(P.m, chunks, c, begin, end);
        Rows<T> rows(n, P.chunks);
        std::vector<T> chunk_rows(p_rows == nullptr ? (end - begin) * n : 0);
        T* held = p_rows == nullptr ? chunk_rows.data() : p_rows + begin * n;
        T* local = maxima.data() + c * n;
        for (int64_t j = begin; j < end; ++j) {
            T* row = held + (j - begin) * n;
            piecewise_row(P, j, row, rows.roots.data(), rows);
            for (int64_t i = 0; i < n; ++i) local[i] = std::max(local[i], row[i]);
        }
        for (int64_t j = begin; j < end; ++j) exp_terms(P, held + (j - begin) * n, local, sums.data() + c * n);
    });
    for (int64_t i = 0; i < n; ++i) column_max[i] = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < chunks; ++c)
        for (int64_t i = 0; i < n; ++i) column_max[i] = std::max(column_max[i], maxima[c * n + i]);
    const double gamma = P.gamma;
    for (int64_t i = 0; i < n; ++i) {
        double total = 0;
        for (int64_t c = 0; c < chunks; ++c) {
            const double shift = maxima[c * n + i] == column_max[i]
                                     ? 1.0
                                     : std::exp((double(maxima[c * n + i]) - double(column_max[i])) / gamma);
            total += sums[c * n + i] * shift;
        }
        column_sum[i] = static_cast<T>(total);
    }
}

constexpr int64_t kChunk = 1 << 14;  // the values a thread takes at a time in flat loops

// count values of T, left uninitialized (a vector would first zero them: a pass for nothing).
template <typename T>
struct Buffer {
    std::unique_ptr<T, decltype(&std::free)> values{nullptr, &std::free};
    T* allocate(int64_t count) {
        values.reset(static_cast<T*>(tensor_peft::cpu::allocate_memory(count * sizeof(T))));
        return values.get();
    }
    T* data() const { return values.get(); }
};

// Mixture's column statistics (n values each) while a call runs.
template <typename T>
struct ColumnStatistics {
    std::vector<T> column_max, column_sum;
};

// P's column statistics into `held` and P, for mixture when P has none; returns whether
// they were made, and then P's rows are left in `p_rows` (m, n) when given.
template <typename T>
bool ensure_statistics(Problem<T>& P, ColumnStatistics<T>& held, T* p_rows = nullptr) {
    if (P.kernel != kMixture || P.column_max != nullptr) return false;
    held.column_max.resize(P.n);
    held.column_sum.resize(P.n);
    mixture_statistics(P, held.column_max.data(), held.column_sum.data(), p_rows);
    P.column_max = held.column_max.data();
    P.column_sum = held.column_sum.data();
    return true;
}

}  // namespace
