// SNELL's threshold on the CPU: τ = the k-th smallest |ΔW_raw| by radix select
// (tensor_peft/radix_select.h; the first digit is counted as each row is computed, the
// later digits among the keys of its chosen bin), and the mask hard ΔW·|ΔW|·1[|ΔW| > τ] or
// soft ΔW·(|ΔW| − τ⁺)·1[|ΔW| > τ].
// Included by csrc/cpu/kernelized.cpp alone: its contents are in an anonymous namespace,
// as they were in that one translation unit.
#pragma once

#include <algorithm>
#include <cstdint>
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

// out = x·mask_factor(x), in place allowed.
template <typename T>
TP_CPU_CLONES void apply_mask(const T* x, T* out, int64_t count, T tau, int mode) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) out[i] = x[i] * mask_factor(x[i], tau, mode, false);
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

}  // namespace
