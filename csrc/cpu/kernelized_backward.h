// SNELL's backward on the CPU: recomputes the rows from the embeddings (nothing m×n is
// kept between forward and backward), hands back the sparsified ΔW when asked (a linear
// layer's ∂input), applies the derivative of the sparsification with τ and |ΔW| (hard) held
// constant, and reduces into the gradients: rows of Out per row, columns of In and the
// kernel parameters in partials per fixed chunk of rows, added in chunk order
// (tensor_peft/threads.h: the same bits at any thread count). For ΔW inside a linear
// layer, ∂L/∂ΔW = grad_outᵀ·input is computed only at the kept entries (sampled_upstream).
// Included by csrc/cpu/kernelized.cpp alone: its contents are in an anonymous namespace,
// as they were in that one translation unit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernelized_rows.h"
#include "kernelized_select.h"
#include "tensor_peft/partial_sums.h"

namespace {

using tensor_peft::cpu::fold_lanes, tensor_peft::cpu::kLanes;

// Where a backward writes the sparsified ΔW it rebuilds (a linear layer's ∂input reads it):
// `values` (m, n), none when null; given W0's rows `weight` (row j at weight + j·weight_stride),
// W0 + ΔW there instead, as apply_mask adds.
template <typename T>
struct DeltaOutput {
    T* values = nullptr;
    const T* weight = nullptr;
    int64_t weight_stride = 0;
    // Row j of it from the raw row K.
    void write(const T* K, int64_t j, int64_t n, T tau, int mode) const {
        apply_mask(K, values + j * n, n, tau, mode, weight == nullptr ? nullptr : weight + j * weight_stride);
    }
};

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
// ∂b_j = Σ_i W_i a_i, ∂a_i += W_i b_j. The row sums in lanes (tensor_peft/partial_sums.h).
template <bool Distance, typename T>
inline void embedding_gradients(const Problem<T>& P, int64_t j, int64_t h, const T* W, T* d_out_emb,
                                Partials<T>& acc) {
    const int64_t n = P.n, whole = n - n % kLanes;
    const T* b = P.out_emb + (h * P.m + j) * P.width;
    T* db = d_out_emb + (h * P.m + j) * P.width;
    for (int64_t d = 0; d < P.width; ++d) {
        const T* a = P.in_t + (h * P.width + d) * n;
        T* da = acc.d_in_t.data() + (h * P.width + d) * n;
        const T bd = b[d];
        T lanes[kLanes] = {};
        for (int64_t start = 0; start < whole; start += kLanes) {
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) {
                const int64_t i = start + l;
                const T w = Distance ? W[i] * (bd - a[i]) : W[i] * a[i];
                lanes[l] += w;
                da[i] += Distance ? -w : W[i] * bd;
            }
        }
        T sum = fold_lanes(lanes);
        for (int64_t i = whole; i < n; ++i) {
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
// dot product over the tokens: the dense product's work times the kept fraction. Given a
// `delta` output, the sparsified ΔW (or W0 + ΔW) is written there from the rows the mask
// is taken of.
template <typename T>
SparseRows<T> sampled_upstream(const Problem<T>& P, const T* grad_out, const T* input, int64_t tokens, T tau,
                               int mode, const DeltaOutput<T>& delta) {
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
                if (delta.values != nullptr) delta.write(K.data(), j, n, tau, mode);
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

// D = g·(the sparsification's derivative at the raw row K) over n entries (g alone for kNone).
template <typename T>
TP_CPU_CLONES void masked_upstream(const T* g, const T* K, int64_t n, T tau, int mode, T* D) {
    if (mode == kNone) {
        std::copy(g, g + n, D);
        return;
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) D[i] = g[i] * mask_factor(K[i], tau, mode, true);
}

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
    masked_upstream(up.grad + j * n, K, n, tau, mode, D);
}

// Row j of D = ∂L/∂ΔW_raw, and what backward_row and the softmax's gradient read: P and
// the roots (piecewise_linear, mixture) and S (mixture) into rows. ΔW_raw's row K is made
// when the mask of dense Γ needs it, `delta` (m, n) is given, which gets its
// sparsified row, or the kernel is mixture (as raw_row makes it: the same bits).
template <typename T>
void row_upstream(const Problem<T>& P, const Upstream<T>& up, int64_t j, T tau, int mode, const DeltaOutput<T>& delta,
                  T* K, T* D,
                  Rows<T>& rows) {
    const bool need_raw = (mode != kNone && up.sparse == nullptr) || delta.values != nullptr;
    if (is_piecewise(P.kernel)) {
        piecewise_row(P, j, rows.piecewise.data(), rows.roots.data(), rows);
        if (need_raw || P.kernel == kMixture) std::copy(rows.piecewise.begin(), rows.piecewise.end(), K);
        if (P.kernel == kMixture) add_softmax_terms(P, K, rows.soft.data());
    } else if (need_raw) {
        raw_row(P, j, K, rows);
    }
    if (delta.values != nullptr) delta.write(K, j, P.n, tau, mode);
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
// given a `delta` output (mode ≠ kNone), the sparsified ΔW the mask was taken of (or W0 + ΔW). Mixture
// takes two passes over the rows: the first sums c_i = Σ_j D_ji S_ji, the second the
// gradients. The second pass makes the rows again from the embeddings (mixture's S from
// the column statistics). When mixture's statistics are made here and `delta` is given,
// their pass leaves P's rows in `delta` for the first pass, which adds the softmax terms
// to them instead of making P again (the second pass then writes ΔW over them).
template <typename T>
void backward(Problem<T>& P, const Upstream<T>& up, T tau, int mode, const DeltaOutput<T>& delta, T* d_out_emb,
              T* d_in_t, T* d_coeff,
              T* d_params) {
    const int64_t n = P.n, chunks = row_chunks(P), in_size = P.chunks * P.width * n;
    const bool mixture = P.kernel == kMixture;
    ColumnStatistics<T> held;
    const bool p_held = ensure_statistics(P, held, delta.values) && delta.values != nullptr;
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
                    T* row = delta.values + j * n;
                    add_softmax_terms(P, row, rows.soft.data());
                    upstream_row(P, up, j, row, tau, mode, D.data());
                } else {
                    row_upstream(P, up, j, tau, mode, DeltaOutput<T>{}, K.data(), D.data(), rows);
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

}  // namespace
