// CPU only: exp(x) in plain arithmetic that the compiler vectorizes inside `omp simd`
// loops (with -fno-trapping-math, for the selects; a call to std::exp keeps a loop scalar
// unless -ffast-math lets glibc's vector exp in, which we do not want for the rest of the
// code).
// Within 1 ulp of std::exp (checked against it by tests/ops through the LieRA ops).
//
// exp(x) = 2^k · exp(r) with k = round(x·log2 e) and r = x − k·ln 2 (ln 2 split in a high
// part exact in k·ln2_hi and a low part, Cody–Waite), |r| ≤ ln2/2, and exp(r) by its
// Taylor polynomial: degree 7 for float (truncation < 6e-9 relative), 13 for double
// (< 5e-18). 2^k is applied as two powers of two so that results in the subnormal range
// round once. Overflow gives +inf, underflow 0, NaN stays NaN, as std::exp.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace tensor_peft::cpu {

template <typename T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
    using Bits = int32_t;
    static constexpr int kMantissa = 23, kBias = 127, kDegree = 7;
    static constexpr float kMax = 88.72283935546875f;   // above: exp overflows
    static constexpr float kMin = -103.972084045410156f;  // below: exp rounds to 0
    static constexpr float kLn2Hi = 0.693145751953125f;  // 12 significant bits: k·kLn2Hi is exact
    static constexpr float kLn2Lo = 1.428606765330187e-06f;
    static constexpr float kRound = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
    static constexpr int32_t kRoundBits = 0x4B400000;
};

template <>
struct ExpConstants<double> {
    using Bits = int64_t;
    static constexpr int kMantissa = 52, kBias = 1023, kDegree = 13;
    static constexpr double kMax = 709.782712893383973;
    static constexpr double kMin = -745.133219101941108;
    static constexpr double kLn2Hi = 0.693147180369123816490;  // 32 significant bits
    static constexpr double kLn2Lo = 1.90821492927058770002e-10;
    static constexpr double kRound = 6755399441055744.0;  // 1.5·2^52
    static constexpr int64_t kRoundBits = 0x4338000000000000;
};

// 2^k for an integer-valued k in the normal range: k's two's complement bits are the low
// bits of k + kRound (its ulp is 1), so the exponent field is built with integer adds and
// shifts only (no float→int conversion, which AVX2 lacks for doubles).
template <typename T>
inline T power_of_two(T k) {
    using C = ExpConstants<T>;
    const T shifted = k + C::kRound;
    typename C::Bits bits;
    std::memcpy(&bits, &shifted, sizeof(T));
    bits = (bits - C::kRoundBits + C::kBias) << C::kMantissa;
    T value;
    std::memcpy(&value, &bits, sizeof(T));
    return value;
}

// 1 + r(1 + r/2(1 + r/3(… (1 + r/Degree)))): exp(r)'s Taylor polynomial, unrolled at
// compile time (a loop would keep the caller's loop from vectorizing).
template <typename T, int Degree>
struct Taylor {
    static inline T horner(T r, T inner) { return Taylor<T, Degree - 1>::horner(r, T(1) + inner * r * (T(1) / T(Degree))); }
};

template <typename T>
struct Taylor<T, 0> {
    static inline T horner(T, T inner) { return inner; }
};

template <typename T>
inline T vector_exp(T x) {
    using C = ExpConstants<T>;
    const T low = C::kMin, high = C::kMax;  // values, not the members' addresses, in the selects
    const T clamped = x > low ? (x < high ? x : high) : low;  // NaN: low, a finite stand-in
    const T k = (clamped * T(1.4426950408889634) + C::kRound) - C::kRound;
    const T r = (clamped - k * C::kLn2Hi) - k * C::kLn2Lo;
    const T p = Taylor<T, C::kDegree>::horner(r, T(1));
    const T half = (k * T(0.5) + C::kRound) - C::kRound;  // 2^k as 2^half·2^(k − half): each normal
    T result = p * power_of_two(half) * power_of_two(k - half);
    result = x > high ? std::numeric_limits<T>::infinity() : result;
    result = x < low ? T(0) : result;
    return x != x ? x : result;
}

}  // namespace tensor_peft::cpu
