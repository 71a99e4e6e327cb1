// SNELL's kernelized low-rank update and its competition sparsification, fused.
//
// ΔW_raw[j, i] = κ(b_j, a_i) for the m rows of Out (H, m, p) and the n columns of In,
// passed transposed as (H, p, n) so that each row j is computed for all i at once with
// unit-stride loops; each entry's κ and gradient are those of tensor_peft/kernelized.h.
// Mixture P + alpha·softmax_j(P/gamma) + beta: the softmax runs down each column, its max
// and sum (n values each) come from one pass making P's rows (mixture_statistics), and each
// row's E = exp((P − max_j P)/gamma), S = E/Σ is made with the row: nothing m×n is held. The
// difference is taken before the division, which keeps a small gamma from magnifying the
// rounding of P/gamma.
//
// Sparsification (mode 1 hard, 2 soft): τ = the k-th smallest |ΔW_raw| by radix select
// (tensor_peft/radix_select.h; the first digit is counted as each row is computed, the
// later digits among the keys of its chosen bin), or a τ given (a layer rebuilding ΔW in
// backward), then in place hard ΔW·|ΔW|·1[|ΔW| > τ] or soft ΔW·(|ΔW| − τ⁺)·1[|ΔW| > τ]
// (each row as it is computed when τ is given). Backward recomputes the rows from the
// embeddings (nothing m×n is kept between forward and backward), hands back the sparsified
// ΔW when asked (a linear layer's ∂input), applies the derivative of the sparsification
// with τ and |ΔW| (hard) held constant, and reduces into the gradients: rows of Out per row,
// columns of In and the kernel parameters in partials per fixed chunk of rows, added in
// chunk order (tensor_peft/threads.h: the same bits at any thread count). For
// ΔW inside a linear layer, ∂L/∂ΔW = grad_outᵀ·input is computed only at the kept entries
// (sampled_upstream).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "tensor_peft/arguments.h"
#include "tensor_peft/common.h"
#include "tensor_peft/huge_pages.h"
#include "tensor_peft/kernelized.h"
#include "tensor_peft/radix_select.h"
#include "tensor_peft/threads.h"
#include "tensor_peft/vector_exp.h"


namespace py = pybind11;

namespace {

using namespace tensor_peft::kernelized;  // ids, κ and its gradient per entry, mask_factor
using tensor_peft::cpu::chunk_count, tensor_peft::cpu::chunk_range, tensor_peft::cpu::for_each_chunk;
using tensor_peft::cpu::vector_exp;
namespace arguments = tensor_peft::arguments;

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

// Counts of the first radix digit of |x| (Key::kDigit wide), added into counts.
template <typename T>
inline void count_first_digits(const T* x, int64_t count, int64_t* counts) {
    using Key = tensor_peft::radix::Key<T>;
    for (int64_t i = 0; i < count; ++i) ++counts[tensor_peft::radix::abs_key(x[i]) >> (Key::kBits - Key::kDigit)];
}

template <typename T>
constexpr int64_t first_digit_bins() {
    return int64_t(1) << tensor_peft::radix::Key<T>::kDigit;
}

// out = x·mask_factor(x), in place allowed.
template <typename T>
TP_CPU_CLONES void apply_mask(const T* x, T* out, int64_t count, T tau, int mode) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) out[i] = x[i] * mask_factor(x[i], tau, mode, false);
}

// ΔW_raw into out, row by row; each row, while in cache, is then either counted into
// first_counts (first_digit_bins values: τ is to be selected) or, with mode ≠ kNone,
// masked by tau (τ known). Counts are integers: their sum is exact in any order.
// Mixture's statistics pass leaves P's rows in out, and each row adds its softmax terms
// there: κ is made once.
template <typename T>
void raw(Problem<T>& P, T* out, int64_t* first_counts, int mode, T tau) {
    const int64_t chunks = row_chunks(P);
    ColumnStatistics<T> held;
    const bool p_in_out = ensure_statistics(P, held, out);
    for_each_row_chunk(P, chunks, [&](int64_t, int64_t begin, int64_t end) {
        Rows<T> rows(P.n, P.chunks);
        std::vector<int64_t> counts(first_counts ? first_digit_bins<T>() : 0, 0);
        for (int64_t j = begin; j < end; ++j) {
            T* row = out + j * P.n;
            if (p_in_out)
                add_softmax_terms(P, row, rows.soft.data());
            else
                raw_row(P, j, row, rows);
            if (first_counts)
                count_first_digits(row, P.n, counts.data());
            else if (mode != kNone)
                apply_mask(row, row, P.n, tau, mode);
        }
        if (first_counts) {
#pragma omp critical(tensor_peft_counts)
            for (size_t b = 0; b < counts.size(); ++b) first_counts[b] += counts[b];
        }
    });
}

// The keys key_at(i) of count values that share `prefix` on `prefix_mask`, compacted in
// order into a new vector. Runs of kRun keys are first tested together (a loop that
// vectorizes); a run with a match is then compacted branch-free: each key written to a
// scratch buffer and the end advanced by whether it matches (a branch mispredicted on half
// the keys cost more than the pass). The k-th's bin holds a few percent of the keys, so
// most runs are skipped after the test.
template <typename Bits, typename KeyAt>
std::vector<Bits> matching_keys(KeyAt key_at, int64_t count, Bits prefix, Bits prefix_mask) {
    constexpr int64_t kRun = 32;
    const int64_t chunks = chunk_count(count, kChunk);
    std::vector<std::vector<Bits>> chunk_keys(chunks);
    for_each_chunk(chunks, [&](int64_t c) {
        int64_t begin, end;
        chunk_range(count, chunks, c, begin, end);
        Buffer<Bits> scratch;  // a block and a spare slot
        scratch.allocate(std::min(kChunk, end - begin) + 1);
        for (int64_t start = begin; start < end; start += kChunk) {
            int64_t kept = 0;
            const int64_t stop = std::min(start + kChunk, end);
            for (int64_t run = start; run < stop; run += kRun) {
                const int64_t run_end = std::min(run + kRun, stop);
                int matches = 0;
                for (int64_t i = run; i < run_end; ++i) matches += (key_at(i) & prefix_mask) == prefix;
                if (matches == 0) continue;
                for (int64_t i = run; i < run_end; ++i) {
                    const Bits key = key_at(i);
                    scratch.data()[kept] = key;
                    kept += (key & prefix_mask) == prefix;
                }
            }
            chunk_keys[c].insert(chunk_keys[c].end(), scratch.data(), scratch.data() + kept);
        }
    });
    std::vector<Bits> keys;
    for (const std::vector<Bits>& chunk : chunk_keys) keys.insert(keys.end(), chunk.begin(), chunk.end());
    return keys;
}

// The radix passes after the first digit, over `keys` that all share the found digits
// `prefix` (on prefix_mask): each pass counts the next digit, picks the bin holding rank
// `rank`, and keeps that bin's keys for the next; returns the key of that rank.
template <typename Bits>
Bits select_rest(std::vector<Bits> keys, Bits prefix, Bits prefix_mask, int64_t rank, int high) {
    constexpr int kDigit = 11;  // 2048 bins: per-chunk counts stay in L1
    for (; high > 0; high -= kDigit) {
        const int width = std::min(kDigit, high);
        const int shift = high - width;
        const int64_t bins = int64_t(1) << width, count = int64_t(keys.size());
        std::vector<int64_t> counts(bins, 0);
        const int64_t chunks = chunk_count(count, int64_t(1) << 16);
        for_each_chunk(chunks, [&](int64_t c) {
            int64_t begin, end;
            chunk_range(count, chunks, c, begin, end);
            std::vector<int64_t> local(bins, 0);
            for (int64_t i = begin; i < end; ++i) ++local[(keys[i] >> shift) & (bins - 1)];
#pragma omp critical(tensor_peft_counts)
            for (int64_t b = 0; b < bins; ++b) counts[b] += local[b];
        });
        const int64_t bin = tensor_peft::radix::pick_bin(counts.data(), bins, rank);
        prefix |= Bits(bin) << shift;
        prefix_mask |= Bits(bins - 1) << shift;
        if (shift > 0) keys = matching_keys([&keys](int64_t i) { return keys[i]; }, count, prefix, prefix_mask);
    }
    return prefix;
}

// τ = the k-th smallest |x| (1-based) of count values, given the counts of their first
// digit; −inf when k = 0. The keys in the first digit's chosen bin are copied out, and
// the later passes read only them.
template <typename T>
T kth_smallest_magnitude(const T* x, int64_t count, int64_t k, const int64_t* first_counts) {
    using Key = tensor_peft::radix::Key<T>;
    using Bits = typename Key::type;
    if (k == 0) return -std::numeric_limits<T>::infinity();
    const int shift = Key::kBits - Key::kDigit;
    int64_t rank = k;
    const int64_t bin = tensor_peft::radix::pick_bin(first_counts, first_digit_bins<T>(), rank);
    const Bits prefix = Bits(bin) << shift, prefix_mask = Bits(first_digit_bins<T>() - 1) << shift;
    std::vector<Bits> keys = matching_keys([x](int64_t i) { return tensor_peft::radix::abs_key(x[i]); }, count,
                                           prefix, prefix_mask);
    return tensor_peft::radix::from_key<T>(select_rest(std::move(keys), prefix, prefix_mask, rank, shift));
}

// τ of count values by the passes above, the first digit counted here.
template <typename T>
T kth_smallest_magnitude(const T* x, int64_t count, int64_t k) {
    std::vector<int64_t> first_counts(first_digit_bins<T>(), 0);
    const int64_t chunks = chunk_count(count, kChunk);
    for_each_chunk(chunks, [&](int64_t c) {
        int64_t begin, end;
        chunk_range(count, chunks, c, begin, end);
        std::vector<int64_t> local(first_digit_bins<T>(), 0);
        count_first_digits(x + begin, end - begin, local.data());
#pragma omp critical(tensor_peft_counts)
        for (size_t b = 0; b < local.size(); ++b) first_counts[b] += local[b];
    });
    return kth_smallest_magnitude(x, count, k, first_counts.data());
}

// out = x·mask_factor(x) over count values, in place allowed, in parallel.
template <typename T>
void mask(const T* x, T* out, int64_t count, T tau, int mode) {
#pragma omp parallel for schedule(static)
    for (int64_t start = 0; start < count; start += kChunk)
        apply_mask(x + start, out + start, std::min(kChunk, count - start), tau, mode);
}

// A chunk's gradient partials; sums over all m·n entries accumulate in double.
template <typename T>
struct Partials {
    std::vector<T> d_in_t;
    std::vector<double> d_coeff;
    double d_alpha = 0, d_beta = 0, d_gamma = 0;
    explicit Partials(const Problem<T>& P) : d_in_t(P.chunks * P.width * P.n, T(0)), d_coeff(P.chunks, 0.0) {}
};

// Row j's share of the embedding gradients of chunk h from the weights W (n): distance
// kernels ∂b_j = Σ_i W_i (b_j − a_i), ∂a_i −= W_i (b_j − a_i); dot-product kernels
// ∂b_j = Σ_i W_i a_i, ∂a_i += W_i b_j.
template <bool Distance, typename T>
inline void embedding_gradients(const Problem<T>& P, int64_t j, int64_t h, const T* W, T* d_out_emb,
                                Partials<T>& acc) {
    const int64_t n = P.n;
    const T* b = P.out_emb + (h * P.m + j) * P.width;
    T* db = d_out_emb + (h * P.m + j) * P.width;
    for (int64_t d = 0; d < P.width; ++d) {
        const T* a = P.in_t + (h * P.width + d) * n;
        T* da = acc.d_in_t.data() + (h * P.width + d) * n;
        const T bd = b[d];
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; ++i) {
            const T w = Distance ? W[i] * (bd - a[i]) : W[i] * a[i];
            sum += w;
            da[i] += Distance ? -w : W[i] * bd;
        }
        db[d] = sum;
    }
}

// Gradients of row j given D = ∂L/∂(the kernel's output before mixture's softmax term)
// (for mixture: ∂L/∂P), entry by entry as tensor_peft/kernelized.h: d_out_emb rows j
// (written), the rest into partials. Piecewise and mixture read row j's roots (H·n).
template <typename T>
TP_CPU_CLONES void backward_row(const Problem<T>& P, int64_t j, const T* D, const T* roots, T* d_out_emb,
                                Partials<T>& acc, Rows<T>& rows) {
    const int64_t n = P.n;
    T* W = rows.scratch.data();
    if (!is_piecewise(P.kernel)) {
        if (backward_reads_x(P.kernel)) reductions(P, j, W, rows);
        with_kernel(P.kernel, [&](auto kernel) {
            for (int64_t i = 0; i < n; ++i)
                W[i] = backward<T>(kernel, D[i], W[i], P.alpha, P.beta, acc.d_alpha, acc.d_beta, acc.d_gamma);
        });
        for (int64_t h = 0; h < P.chunks; ++h) {
            if (is_dot_product(P.kernel))
                embedding_gradients<false>(P, j, h, W, d_out_emb, acc);
            else
                embedding_gradients<true>(P, j, h, W, d_out_emb, acc);
        }
        return;
    }
    for (int64_t h = 0; h < P.chunks; ++h) {
        const T* root = roots + h * n;
        const T c = P.coeff[h];
        double d_coeff = 0;
#pragma omp simd reduction(+ : d_coeff)
        for (int64_t i = 0; i < n; ++i) {
            const ChunkGradient<T, T> g = piecewise_backward<T>(D[i], c, root[i]);
            d_coeff += g.coeff;
            W[i] = g.weight;
        }
        acc.d_coeff[h] += d_coeff;
        embedding_gradients<true>(P, j, h, W, d_out_emb, acc);
    }
}

// D = ∂L/∂ΔW_raw (the upstream Γ times the sparsification's derivative) of the entries the
// mask keeps, row by row: columns[row_start[j] .. row_start[j + 1]) ascending, with values.
template <typename T>
struct SparseRows {
    std::vector<int64_t> row_start;
    std::vector<int32_t> columns;
    std::vector<T> values;
};

// dst (cols, rows) = src (rows, cols)ᵀ by 32×32 blocks, with the given row strides.
template <typename T>
void transpose(const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst, int64_t dst_stride) {
    constexpr int64_t kBlock = 32;
    for (int64_t r0 = 0; r0 < rows; r0 += kBlock)
        for (int64_t c0 = 0; c0 < cols; c0 += kBlock)
            for (int64_t c = c0; c < std::min(c0 + kBlock, cols); ++c)
                for (int64_t r = r0; r < std::min(r0 + kBlock, rows); ++r)
                    dst[c * dst_stride + r] = src[r * src_stride + c];
}

// values[e] += Σ_t g[t]·x_e[t] over `width` tokens for row j's kept entries e from `e` on
// while their column is below `stop`, x_e = x + columns[e]·stride; returns the first entry
// not done. Four entries at a time share the loads of g and keep four sums in flight.
template <typename T>
TP_CPU_CLONES int64_t accumulate_row(const T* g, const T* x, int64_t stride, int64_t width, const int32_t* columns,
                                     T* values, int64_t e, int64_t end, int64_t stop) {
    int64_t last = e;
    while (last < end && columns[last] < stop) ++last;
    for (; e + 4 <= last; e += 4) {
        const T* x0 = x + columns[e] * stride;
        const T* x1 = x + columns[e + 1] * stride;
        const T* x2 = x + columns[e + 2] * stride;
        const T* x3 = x + columns[e + 3] * stride;
        T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t t = 0; t < width; ++t) {
            s0 += g[t] * x0[t];
            s1 += g[t] * x1[t];
            s2 += g[t] * x2[t];
            s3 += g[t] * x3[t];
        }
        values[e] += s0;
        values[e + 1] += s1;
        values[e + 2] += s2;
        values[e + 3] += s3;
    }
    for (; e < last; ++e) {
        const T* x_e = x + columns[e] * stride;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < width; ++t) sum += g[t] * x_e[t];
        values[e] += sum;
    }
    return last;
}

// For a linear layer y = x·(W0 + ΔW)ᵀ: D from Γ = grad_outᵀ·input (grad_out (tokens, m),
// input (tokens, n)) computed only where the mask (|ΔW_raw| > τ) keeps an entry, each as a
// dot product over the tokens: the dense product's work times the kept fraction. Given
// `delta` (m, n), the sparsified ΔW is written there from the rows the mask is taken of.
template <typename T>
SparseRows<T> sampled_upstream(const Problem<T>& P, const T* grad_out, const T* input, int64_t tokens, T tau,
                               int mode, T* delta) {
    const int64_t m = P.m, n = P.n;
    SparseRows<T> D;
    std::vector<T> factors;
    const int64_t chunks = row_chunks(P);
    {  // the kept entries of each row and the sparsification's derivative there
        std::vector<std::vector<int32_t>> chunk_columns(chunks);
        std::vector<std::vector<T>> chunk_factors(chunks);
        std::vector<int64_t> row_count(m);
        for_each_row_chunk(P, chunks, [&](int64_t c, int64_t begin, int64_t end) {
            std::vector<int32_t>& columns = chunk_columns[c];
            std::vector<T>& kept_factors = chunk_factors[c];
            Rows<T> rows(n, P.chunks);
            std::vector<T> K(n);
            for (int64_t j = begin; j < end; ++j) {
                raw_row(P, j, K.data(), rows);
                if (delta != nullptr) apply_mask(K.data(), delta + j * n, n, tau, mode);
                const size_t before = columns.size();
                for (int64_t i = 0; i < n; ++i) {
                    const T factor = mask_factor(K[i], tau, mode, true);
                    if (factor == T(0)) continue;
                    columns.push_back(static_cast<int32_t>(i));
                    kept_factors.push_back(factor);
                }
                row_count[j] = static_cast<int64_t>(columns.size() - before);
            }
        });
        D.row_start.assign(m + 1, 0);  // chunks hold runs of consecutive rows, in chunk order
        for (int64_t j = 0; j < m; ++j) D.row_start[j + 1] = D.row_start[j] + row_count[j];
        for (int64_t c = 0; c < chunks; ++c) {
            D.columns.insert(D.columns.end(), chunk_columns[c].begin(), chunk_columns[c].end());
            factors.insert(factors.end(), chunk_factors[c].begin(), chunk_factors[c].end());
        }
    }
    D.values.assign(D.columns.size(), T(0));
    // input is transposed once, to (n, tokens). Then per chunk of rows and tile of tokens,
    // the chunk transposes its rows' slice of grad_out, and per block of columns every row's
    // kept entries in the block are summed while the block's slice of input (256 KB in
    // float) stays in L2. Chunks are large (kSampledRows) so that few of them read input.
    // Each entry sums its tiles in token order, whichever thread runs its chunk.
    constexpr int64_t kTokens = 256, kColumns = 256, kSampledRows = 128;
    std::vector<T> input_t(n * tokens);
    const int64_t column_blocks = (n + kColumns - 1) / kColumns;
    for_each_chunk(column_blocks, [&](int64_t b) {
        const int64_t c0 = b * kColumns;
        transpose(input + c0, n, tokens, std::min(kColumns, n - c0), input_t.data() + c0 * tokens, tokens);
    });
    const int64_t sampled_chunks = chunk_count(m, kSampledRows);
    for_each_chunk(sampled_chunks, [&](int64_t c) {
        int64_t first_row, end_row;
        chunk_range(m, sampled_chunks, c, first_row, end_row);
        std::vector<T> grad_tile((end_row - first_row) * kTokens);
        std::vector<int64_t> cursor(end_row - first_row);
        for (int64_t t0 = 0; t0 < tokens; t0 += kTokens) {
            const int64_t width = std::min(kTokens, tokens - t0);
            transpose(grad_out + t0 * m + first_row, m, width, end_row - first_row, grad_tile.data(), width);
            for (int64_t j = first_row; j < end_row; ++j) cursor[j - first_row] = D.row_start[j];
            for (int64_t c0 = 0; c0 < n; c0 += kColumns) {
                for (int64_t j = first_row; j < end_row; ++j) {
                    int64_t& e = cursor[j - first_row];
                    e = accumulate_row(grad_tile.data() + (j - first_row) * width, input_t.data() + t0, tokens, width,
                                       D.columns.data(), D.values.data(), e, D.row_start[j + 1], c0 + kColumns);
                }
            }
        }
    });
#pragma omp parallel for schedule(static)
    for (int64_t e = 0; e < static_cast<int64_t>(D.values.size()); ++e) D.values[e] *= factors[e];
    return D;
}

// Γ dense (m, n), or the kept entries' D of a linear layer (sampled_upstream).
template <typename T>
struct Upstream {
    const T* grad;
    const SparseRows<T>* sparse;
};

// D = row j of ∂L/∂ΔW_raw; from dense Γ with mode ≠ kNone, K is the raw row.
template <typename T>
inline void upstream_row(const Problem<T>& P, const Upstream<T>& up, int64_t j, const T* K, T tau, int mode, T* D) {
    const int64_t n = P.n;
    if (up.sparse != nullptr) {
        std::fill(D, D + n, T(0));
        const SparseRows<T>& rows = *up.sparse;
        for (int64_t e = rows.row_start[j]; e < rows.row_start[j + 1]; ++e) D[rows.columns[e]] = rows.values[e];
        return;
    }
    const T* g = up.grad + j * n;
    for (int64_t i = 0; i < n; ++i) D[i] = mode == kNone ? g[i] : g[i] * mask_factor(K[i], tau, mode, true);
}

// Row j of D = ∂L/∂ΔW_raw, and what backward_row and the softmax's gradient read: P and
// the roots (piecewise_linear, mixture) and S (mixture) into rows. ΔW_raw's row K is made
// when the mask of dense Γ needs it, `delta` (m, n) is given, which gets its
// sparsified row, or the kernel is mixture (as raw_row makes it: the same bits).
template <typename T>
void row_upstream(const Problem<T>& P, const Upstream<T>& up, int64_t j, T tau, int mode, T* delta, T* K, T* D,
                  Rows<T>& rows) {
    const bool need_raw = (mode != kNone && up.sparse == nullptr) || delta != nullptr;
    if (is_piecewise(P.kernel)) {
        piecewise_row(P, j, rows.piecewise.data(), rows.roots.data(), rows);
        if (need_raw || P.kernel == kMixture) std::copy(rows.piecewise.begin(), rows.piecewise.end(), K);
        if (P.kernel == kMixture) add_softmax_terms(P, K, rows.soft.data());
    } else if (need_raw) {
        raw_row(P, j, K, rows);
    }
    if (delta != nullptr) apply_mask(K, delta + j * P.n, P.n, tau, mode);
    upstream_row(P, up, j, K, tau, mode, D);
}

// Mixture's first backward pass at row j, with S's row `soft`: local[i] += D_i·S_i (the
// chunk's share of c_i = Σ_j D_ji S_ji), and ∂alpha, ∂beta.
template <typename T>
TP_CPU_CLONES void softmax_dots(const Problem<T>& P, const T* soft, const T* D, double* local, Partials<T>& acc) {
    const int64_t n = P.n;
    double d_alpha = 0, d_beta = 0;
#pragma omp simd reduction(+ : d_alpha, d_beta)
    for (int64_t i = 0; i < n; ++i) {
        const T weighted = D[i] * soft[i];
        local[i] += weighted;
        d_alpha += weighted;
        d_beta += D[i];
    }
    acc.d_alpha += d_alpha;
    acc.d_beta += d_beta;
}

// Mixture at row j, with P's row and S's row `soft`: D = ∂L/∂K into ∂L/∂P in place, and
// ∂gamma (mixture_backward).
template <typename T>
TP_CPU_CLONES void softmax_backward(const Problem<T>& P, const T* piecewise, const T* soft, const T* column_dot, T* D,
                                    Partials<T>& acc) {
    const T* max = P.column_max;
    const T alpha = P.alpha, gamma = P.gamma;
    const int64_t n = P.n;
    double d_gamma = 0;
#pragma omp simd reduction(+ : d_gamma)
    for (int64_t i = 0; i < n; ++i) {
        const MixtureGradient<T, T> g =
            mixture_backward<T>(D[i], soft[i], column_dot[i], alpha, gamma, piecewise[i], max[i]);
        d_gamma += g.gamma;
        D[i] = g.piecewise;
    }
    acc.d_gamma += d_gamma;
}

// The whole backward from ∂L/∂(output) (`up`); with mode ≠ kNone the output was sparsified
// with τ. Writes d_out_emb (H, m, p), d_in_t (H, p, n), d_coeff (H), d_params (3) and,
// given `delta` (m, n; mode ≠ kNone), the sparsified ΔW the mask was taken of. Mixture
// takes two passes over the rows: the first sums c_i = Σ_j D_ji S_ji, the second the
// gradients. The second pass makes the rows again from the embeddings (mixture's S from
// the column statistics). When mixture's statistics are made here and `delta` is given,
// their pass leaves P's rows in `delta` for the first pass, which adds the softmax terms
// to them instead of making P again (the second pass then writes ΔW over them).
template <typename T>
void backward(Problem<T>& P, const Upstream<T>& up, T tau, int mode, T* delta, T* d_out_emb, T* d_in_t, T* d_coeff,
              T* d_params) {
    const int64_t n = P.n, chunks = row_chunks(P), in_size = P.chunks * P.width * n;
    const bool mixture = P.kernel == kMixture;
    ColumnStatistics<T> held;
    const bool p_held = ensure_statistics(P, held, delta) && delta != nullptr;
    std::vector<T> column_dot(n, T(0));
    std::vector<Partials<T>> partials(chunks, Partials<T>(P));
    if (mixture) {
        std::vector<std::vector<double>> dots(chunks);
        for_each_row_chunk(P, chunks, [&](int64_t c, int64_t begin, int64_t end) {
            Rows<T> rows(n, P.chunks);
            std::vector<double>& local = dots[c];
            local.assign(n, 0.0);
            std::vector<T> K(n), D(n);
            for (int64_t j = begin; j < end; ++j) {
                if (p_held) {
                    T* row = delta + j * n;
                    add_softmax_terms(P, row, rows.soft.data());
                    upstream_row(P, up, j, row, tau, mode, D.data());
                } else {
                    row_upstream(P, up, j, tau, mode, static_cast<T*>(nullptr), K.data(), D.data(), rows);
                }
                softmax_dots(P, rows.soft.data(), D.data(), local.data(), partials[c]);
            }
        });
        for (int64_t i = 0; i < n; ++i) {
            double total = 0;
            for (int64_t c = 0; c < chunks; ++c) total += dots[c][i];
            column_dot[i] = static_cast<T>(total);
        }
    }
    for_each_row_chunk(P, chunks, [&](int64_t c, int64_t begin, int64_t end) {
        Rows<T> rows(n, P.chunks);
        Partials<T>& acc = partials[c];
        std::vector<T> D(n), K(n);
        for (int64_t j = begin; j < end; ++j) {
            row_upstream(P, up, j, tau, mode, delta, K.data(), D.data(), rows);
            if (mixture) softmax_backward(P, rows.piecewise.data(), rows.soft.data(), column_dot.data(), D.data(), acc);
            backward_row(P, j, D.data(), rows.roots.data(), d_out_emb, acc, rows);
        }
    });
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t i = 0; i < in_size; ++i) {
        T total = T(0);
        for (int64_t c = 0; c < chunks; ++c) total += partials[c].d_in_t[i];
        d_in_t[i] = total;
    }
    double d_alpha = 0, d_beta = 0, d_gamma = 0;
    std::vector<double> coeff_sum(P.chunks, 0.0);
    for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t h = 0; h < P.chunks; ++h) coeff_sum[h] += partials[c].d_coeff[h];
        d_alpha += partials[c].d_alpha;
        d_beta += partials[c].d_beta;
        d_gamma += partials[c].d_gamma;
    }
    for (int64_t h = 0; h < P.chunks; ++h) d_coeff[h] = static_cast<T>(coeff_sum[h]);
    d_params[0] = static_cast<T>(d_alpha);
    d_params[1] = static_cast<T>(d_beta);
    d_params[2] = static_cast<T>(d_gamma);
}

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

// The sparsified ΔW's output of a backward kernel: none for address 0, else `count` values;
// only a sparsified ΔW (mode ≠ kNone) has one.
template <typename T>
T* sparsified_output(std::uintptr_t address, int64_t count, int mode) {
    if (address == 0) return nullptr;
    if (mode == kNone) throw py::value_error("delta: only a sparsified ΔW (mode 1 or 2) is written by the backward");
    return arguments::pointer<T>(address, count, "delta");
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
              if (sparsification == kNone || k == 0) {
                  raw(P, o, nullptr, sparsification, static_cast<T>(k == 0 ? given_tau : 0.0));
                  return given_tau;
              }
              std::vector<int64_t> first_counts(first_digit_bins<T>(), 0);
              raw(P, o, first_counts.data(), sparsification, T(0));
              const T tau = kth_smallest_magnitude(static_cast<const T*>(o), rows * n, k, first_counts.data());
              mask(o, o, rows * n, tau, sparsification);
              return double(tau);
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
             std::uintptr_t d_params, std::uintptr_t delta) {
              Problem<T> P = problem<T>(out_emb, in_t, rows, n, chunks, width, kernel, coeff, params, eps);
              const int sparsification = arguments::choice(mode, kNone, kSoft, "mode");
              const T* g = pointer<const T>(grad, rows * n, "grad");
              const Gradients<T> d(P, d_out_emb, d_in_t, d_coeff, d_params);
              T* out_delta = sparsified_output<T>(delta, rows * n, sparsification);
              py::gil_scoped_release release;
              if (out_delta != nullptr) tensor_peft::cpu::advise_huge_pages(out_delta, rows * n * sizeof(T));
              backward(P, Upstream<T>{g, nullptr}, static_cast<T>(tau), sparsification, out_delta, d.d_out_emb,
                       d.d_in_t, d.d_coeff, d.d_params);
          },
          py::arg("grad"), py::arg("out_emb"), py::arg("in_t"), py::arg("rows"), py::arg("n"), py::arg("chunks"),
          py::arg("width"), py::arg("kernel"), py::arg("coeff"), py::arg("params"), py::arg("eps"), py::arg("tau"),
          py::arg("mode"), py::arg("d_out_emb"), py::arg("d_in_t"), py::arg("d_coeff"), py::arg("d_params"),
          py::arg("delta") = 0,
          "Gradients of the embeddings (In as (H, p, n)) and kernel parameters from ∂L/∂out, the rows "
          "recomputed; mode 1/2 with the τ of the forward, and then, given a delta (m, n) address, the "
          "sparsified ΔW written there.");
    m.def(("sparse_linear_backward_" + suffix).c_str(),
          [](std::uintptr_t grad_out, std::uintptr_t input, int64_t tokens, std::uintptr_t out_emb, std::uintptr_t in_t,
             int64_t rows, int64_t n, int64_t chunks, int64_t width, int64_t kernel, std::uintptr_t coeff,
             std::uintptr_t params, double eps, double tau, int64_t mode, std::uintptr_t d_out_emb,
             std::uintptr_t d_in_t, std::uintptr_t d_coeff, std::uintptr_t d_params, std::uintptr_t delta) {
              Problem<T> P = problem<T>(out_emb, in_t, rows, n, chunks, width, kernel, coeff, params, eps);
              const int sparsification = arguments::choice(mode, kHard, kSoft, "mode");
              T* out_delta = sparsified_output<T>(delta, rows * n, sparsification);
              arguments::at_most(n, INT32_MAX, "n");  // kept entries hold their column in 32 bits
              arguments::size(tokens, "tokens");
              const T* g = pointer<const T>(grad_out, arguments::product(tokens, rows, "tokens × rows"), "grad_out");
              const T* x = pointer<const T>(input, arguments::product(tokens, n, "tokens × n"), "input");
              const Gradients<T> d(P, d_out_emb, d_in_t, d_coeff, d_params);
              py::gil_scoped_release release;
              if (out_delta != nullptr) tensor_peft::cpu::advise_huge_pages(out_delta, rows * n * sizeof(T));
              const T t = static_cast<T>(tau);
              ColumnStatistics<T> held;
              ensure_statistics(P, held);  // the mask needs ΔW_raw's rows
              const SparseRows<T> D = sampled_upstream(P, g, x, tokens, t, sparsification, out_delta);
              backward(P, Upstream<T>{nullptr, &D}, t, sparsification, static_cast<T*>(nullptr), d.d_out_emb, d.d_in_t, d.d_coeff,
                       d.d_params);
          },
          py::arg("grad_out"), py::arg("input"), py::arg("tokens"), py::arg("out_emb"), py::arg("in_t"),
          py::arg("rows"), py::arg("n"), py::arg("chunks"), py::arg("width"), py::arg("kernel"), py::arg("coeff"),
          py::arg("params"), py::arg("eps"), py::arg("tau"), py::arg("mode"), py::arg("d_out_emb"), py::arg("d_in_t"),
          py::arg("d_coeff"), py::arg("d_params"), py::arg("delta") = 0,
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
