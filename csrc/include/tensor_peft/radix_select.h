// The exact k-th smallest |x| by radix select on the bits of |x|: for a non-negative
// IEEE number the bit pattern, read as an unsigned integer, orders like the value, so
// the answer is found one digit of the key at a time, most significant first, each pass
// counting only the keys that share the digits found so far. No sort, counts in 64 bits:
// any number of entries. Shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>
#include <cstring>

#include "tensor_peft/common.h"

namespace tensor_peft::radix {

template <typename T>
struct Key;

// kBits: the bits of a key (the sign bit is cleared); kDigit: the bits of the CPU kernel's
// first pass (its later passes take 11 bits each, the CUDA kernel's all passes 8).
template <>
struct Key<float> {
    using type = uint32_t;
    static constexpr int kBits = 31;
    static constexpr int kDigit = 11;
};

template <>
struct Key<double> {
    using type = uint64_t;
    static constexpr int kBits = 63;
    static constexpr int kDigit = 16;
};

// The key of |x|: its bits without the sign (−0 and +0 both give 0; NaN sorts last).
template <typename T>
TP_INLINE typename Key<T>::type abs_key(T x) {
    typename Key<T>::type bits;
    memcpy(&bits, &x, sizeof(T));
    return bits & ((typename Key<T>::type(1) << Key<T>::kBits) - 1);
}

template <typename T>
TP_INLINE T from_key(typename Key<T>::type key) {
    T value;
    memcpy(&value, &key, sizeof(T));
    return value;
}

// After a pass has counted, per value of the current digit, the keys that match the digits
// found so far: the bin holding the rank-th smallest of them (rank is 1-based; on return,
// the rank inside that bin).
TP_INLINE int64_t pick_bin(const int64_t* counts, int64_t bins, int64_t& rank) {
    int64_t bin = 0;
    while (bin < bins - 1 && counts[bin] < rank) rank -= counts[bin++];
    return bin;
}

}  // namespace tensor_peft::radix
