// SNELL's forward on the CPU: ΔW_raw's rows, the threshold τ = the k-th smallest |ΔW_raw|
// (against a bracket from a sample, select_by_bracket; by radix select, tensor_peft/
// radix_select.h, for small problems and when the bracket misses: select_by_radix), and
// the mask hard ΔW·|ΔW|·1[|ΔW| > τ] or soft ΔW·(|ΔW| − τ⁺)·1[|ΔW| > τ].
// Included by csrc/cpu/kernelized.cpp alone: its contents are in an anonymous namespace,
// as they were in that one translation unit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernelized_rows.h"
#include "tensor_peft/radix_select.h"

namespace {

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

// out = x·mask_factor(x), or W0 + x·mask_factor(x) given W0's values `weight` (one rounding:
// the sum of W0 and the sparsified entry, std::fma); in place allowed.
template <typename T>
TP_CPU_CLONES void apply_mask(const T* x, T* out, int64_t count, T tau, int mode, const T* weight = nullptr) {
    if (weight == nullptr) {
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) out[i] = x[i] * mask_factor(x[i], tau, mode, false);
        return;
    }
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) out[i] = std::fma(x[i], mask_factor(x[i], tau, mode, false), weight[i]);
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

// τ by radix select over all of ΔW_raw, made into out first: the first digit counted as
// each row is made, then the keys of its bin compacted (kth_smallest_magnitude); out
// sparsified by τ.
template <typename T>
T select_by_radix(Problem<T>& P, T* out, int64_t k, int mode) {
    std::vector<int64_t> first_counts(first_digit_bins<T>(), 0);
    raw(P, out, first_counts.data(), mode, T(0));
    const T tau = kth_smallest_magnitude(static_cast<const T*>(out), P.m * P.n, k, first_counts.data());
    mask(out, out, P.m * P.n, tau, mode);
    return tau;
}

// Keys of |ΔW_raw| that decide an entry before τ is known: below `low` it is dropped,
// above `high` it is kept; from low to high it is undecided until τ is selected.
template <typename Bits>
struct Bracket {
    Bits low, high;
    double undecided_fraction;  // the fraction of the sample from low to high
};

// κ at entry (j, i) alone, by the formulas raw_row applies (tensor_peft/kernelized.h) but
// not its loop order: the value of a sample, whose last bits may differ from the row's.
// Mixture reads P's column statistics.
template <typename T>
T entry_value(const Problem<T>& P, int64_t j, int64_t i) {
    T reduced = T(0);  // P for the piecewise kernels, else x
    for (int64_t h = 0; h < P.chunks; ++h) {
        const T* b = P.out_emb + (h * P.m + j) * P.width;
        T sum = T(0);
        for (int64_t d = 0; d < P.width; ++d) {
            const T a = P.in_t[(h * P.width + d) * P.n + i];
            sum += is_dot_product(P.kernel) ? b[d] * a : (b[d] - a) * (b[d] - a);
        }
        reduced += is_piecewise(P.kernel) ? P.coeff[h] * piecewise_root(sum, P.eps) : sum;
    }
    if (P.kernel == kMixture) {
        const T soft = std::exp(softmax_exponent(reduced, P.column_max[i], P.gamma)) / P.column_sum[i];
        return mixture_value(reduced, soft, P.alpha, P.beta);
    }
    return is_piecewise(P.kernel) ? reduced : value<T>(P.kernel, reduced, P.alpha, P.beta, P.gamma);
}

// The sample's size: at most kMaxSample entries and one in kSampleEvery; below
// kMinSample a problem is selected by radix (select_by_radix) alone.
constexpr int64_t kMaxSample = int64_t(1) << 17, kSampleEvery = 16, kMinSample = 4096;

// A bracket around the k-th smallest of ΔW_raw's m·n keys from a sample of its entries at
// pseudo-random positions (a fixed sequence: the same sample for the same shape): the
// sample's keys at the ranks k/(m·n)·s ∓ (5 standard deviations of the sampled rank + 16),
// so that the k-th smallest key of all lies inside but for a chance of about 1e-6 (then the
// caller selects by radix). P has mixture's column statistics when it needs them.
template <typename T>
Bracket<typename tensor_peft::radix::Key<T>::type> sample_bracket(const Problem<T>& P, int64_t k, int64_t size) {
    using Bits = typename tensor_peft::radix::Key<T>::type;
    std::vector<Bits> keys(size);
    const int64_t chunks = chunk_count(size, kChunk);
    for_each_chunk(chunks, [&](int64_t c) {
        int64_t begin, end;
        chunk_range(size, chunks, c, begin, end);
        for (int64_t e = begin; e < end; ++e) {
            uint64_t bits = uint64_t(e + 1) * 0x9E3779B97F4A7C15ull;  // splitmix64 of e + 1
            bits = (bits ^ (bits >> 30)) * 0xBF58476D1CE4E5B9ull;
            bits = (bits ^ (bits >> 27)) * 0x94D049BB133111EBull;
            bits ^= bits >> 31;
            const int64_t j = int64_t((bits >> 32) % uint64_t(P.m)), i = int64_t((bits & 0xFFFFFFFFull) % uint64_t(P.n));
            keys[e] = tensor_peft::radix::abs_key(entry_value(P, j, i));
        }
    });
    const double q = double(k) / (double(P.m) * double(P.n));
    const double margin = 5.0 * std::sqrt(double(size) * q * (1.0 - q)) + 16.0;
    const int64_t low_rank = static_cast<int64_t>(std::floor(q * double(size) - margin));
    const int64_t high_rank = static_cast<int64_t>(std::ceil(q * double(size) + margin));
    Bracket<Bits> bracket{Bits(0), Bits(~Bits(0)), 1.0};
    if (low_rank >= 0) {
        std::nth_element(keys.begin(), keys.begin() + low_rank, keys.end());
        bracket.low = keys[low_rank];
    }
    if (high_rank < size) {
        std::nth_element(keys.begin(), keys.begin() + high_rank, keys.end());
        bracket.high = keys[high_rank];
    }
    bracket.undecided_fraction = double(std::min(high_rank, size - 1) - std::max<int64_t>(low_rank, 0) + 1) / size;
    return bracket;
}

// The entries of a chunk of rows that the bracket leaves undecided (their index in ΔW and
// raw value, in index order; at most `capacity` of them) and the number it decides as
// dropped.
template <typename T>
struct Undecided {
    Buffer<int64_t> index;
    Buffer<T> value;
    int64_t size = 0, capacity = 0, below = 0;
    bool overflow = false;  // more than the chunk's share: the bracket is not informative
    void reserve(int64_t entries) {
        capacity = entries;
        index.allocate(entries);
        value.allocate(entries);
    }
};

// Row `row` (ΔW_raw's values at indices from `first`) classified by the bracket [low, high]
// into `undecided`: one loop that vectorizes counts the entries below and flags the
// undecided ones (a byte each in `flags`, n rounded up to 8 with zeros past n), then the
// flags are read 8 at a time and only the undecided entries visited.
template <typename T, typename Bits>
TP_CPU_CLONES void classify_row(const T* row, int64_t n, int64_t first, Bits low, Bits high, uint8_t* flags,
                                Undecided<T>& undecided) {
    Bits below = 0;  // a row's count fits the key's width (n < 2^31)
#pragma omp simd reduction(+ : below)
    for (int64_t i = 0; i < n; ++i) {
        const Bits key = tensor_peft::radix::abs_key(row[i]);
        below += key < low;
        flags[i] = key >= low && key <= high;
    }
    undecided.below += int64_t(below);
    int64_t size = undecided.size;
    for (int64_t start = 0; start < n; start += 8) {
        uint64_t word;
        std::memcpy(&word, flags + start, sizeof(word));
        for (; word != 0; word &= word - 1) {
            if (size == undecided.capacity) {
                undecided.overflow = true;
                return;
            }
            const int64_t i = start + __builtin_ctzll(word) / 8;
            undecided.index.data()[size] = first + i;
            undecided.value.data()[size] = row[i];
            ++size;
        }
    }
    undecided.size = size;
}

// ΔW = κ(Out, In) sparsified into out (m, n) by the k-th smallest magnitude τ, returned.
// The bracket of a sample (sample_bracket) lets each row, while in cache, count the
// entries it decides as dropped and keep aside the few it leaves undecided; hard rows are
// masked there too (a decided entry's mask does not depend on τ). τ is then selected among
// the undecided entries alone, and their masks written (soft: the whole ΔW masked). When
// the k-th smallest lies outside the bracket, or too many entries are undecided, the whole
// ΔW is made again and τ selected by radix (select_by_radix): the same τ, more time.
template <typename T>
T select_by_bracket(Problem<T>& P, T* out, int64_t k, int mode) {
    using Bits = typename tensor_peft::radix::Key<T>::type;
    const int64_t sample = std::min(kMaxSample, P.m * P.n / kSampleEvery);
    if (sample < kMinSample) return select_by_radix(P, out, k, mode);
    ColumnStatistics<T> held;
    const bool p_in_out = ensure_statistics(P, held, out);
    const Bracket<Bits> bracket = sample_bracket(P, k, sample);
    const int64_t chunks = row_chunks(P);
    std::vector<Undecided<T>> undecided(chunks);
    const T decided_tau = tensor_peft::radix::from_key<T>(bracket.high);
    for_each_row_chunk(P, chunks, [&](int64_t c, int64_t begin, int64_t end) {
        Rows<T> rows(P.n, P.chunks);
        const double entries = double(end - begin) * double(P.n);
        undecided[c].reserve(static_cast<int64_t>(4.0 * bracket.undecided_fraction * entries) + 4 * P.n);
        std::vector<uint8_t> flags((P.n + 7) / 8 * 8, 0);
        for (int64_t j = begin; j < end && !undecided[c].overflow; ++j) {  // overflow: selected by radix below
            T* row = out + j * P.n;
            if (p_in_out)
                add_softmax_terms(P, row, rows.soft.data());
            else
                raw_row(P, j, row, rows);
            classify_row(row, P.n, j * P.n, bracket.low, bracket.high, flags.data(), undecided[c]);
            if (mode == kHard) apply_mask(row, row, P.n, decided_tau, mode);
        }
    });
    int64_t below = 0, count = 0;
    bool overflow = false;
    for (const Undecided<T>& chunk : undecided) {
        below += chunk.below;
        count += chunk.size;
        overflow = overflow || chunk.overflow;
    }
    if (overflow || k <= below || k > below + count) return select_by_radix(P, out, k, mode);
    std::vector<Bits> keys;
    keys.reserve(count);
    for (const Undecided<T>& chunk : undecided)
        for (int64_t e = 0; e < chunk.size; ++e) keys.push_back(tensor_peft::radix::abs_key(chunk.value.data()[e]));
    std::nth_element(keys.begin(), keys.begin() + (k - below - 1), keys.end());
    const T tau = tensor_peft::radix::from_key<T>(keys[k - below - 1]);
    if (mode != kHard) {
        mask(out, out, P.m * P.n, tau, mode);
        return tau;
    }
    for_each_chunk(chunks, [&](int64_t c) {
        const Undecided<T>& chunk = undecided[c];
        const int64_t* index = chunk.index.data();
        const T* value = chunk.value.data();
        for (int64_t e = 0; e < chunk.size; ++e) out[index[e]] = value[e] * mask_factor(value[e], tau, mode, false);
    });
    return tau;
}

// out (m, n) = ΔW = κ(Out, In); with mode ≠ kNone sparsified by τ: the k-th smallest
// magnitude for k > 0 (select_by_bracket), else given_tau. Returns τ (given_tau when
// nothing is selected).
template <typename T>
T forward(Problem<T>& P, T* out, int64_t k, int mode, T given_tau) {
    if (mode == kNone || k == 0) {
        raw(P, out, nullptr, mode, k == 0 ? given_tau : T(0));
        return given_tau;
    }
    return select_by_bracket(P, out, k, mode);
}

}  // namespace
