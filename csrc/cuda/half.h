// The 16-bit storage types of the CUDA kernels. Kernels compute in float32 (float64 in
// the float64 kernels): `widen` turns a stored value into the compute type exactly, and
// `narrow<D>` rounds a computed value into the device storage type D once, to nearest even.
//
// BFloat16 and Float16 are the types the launchers and the g++-compiled binding name
// (16 bits each, no CUDA headers needed); `device_t<S>` is what the kernels read and
// write: under nvcc CUDA's __nv_bfloat16 / __half with their conversion intrinsics; in the
// emulator (g++) the storage types themselves, converted here bit by bit as the GPU does:
//   bfloat16  the float's upper 16 bits rounded to nearest even; a NaN stays a NaN
//             (quiet: the top mantissa bit set), never rounding into infinity.
//   float16   IEEE binary16 rounded to nearest even: subnormals below 2⁻¹⁴, infinity
//             from 65520 up, NaN kept quiet.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "tensor_peft/common.h"

namespace tensor_peft::cuda {

struct BFloat16 {
    uint16_t bits;
};
struct Float16 {
    uint16_t bits;
};

template <typename S>
struct Device {
    using type = S;  // float, double: stored as they are computed
};

TP_INLINE float widen(float x) { return x; }
TP_INLINE double widen(double x) { return x; }

// narrow<D>(x): x rounded once into the device storage type D (float and double: x itself).
template <typename D, typename C>
TP_INLINE D narrow(C x) {
    static_assert(std::is_same_v<D, C>, "a float32/float64 kernel stores in its compute type");
    return x;
}

#if defined(__CUDACC__)
template <>
struct Device<BFloat16> {
    using type = __nv_bfloat16;
};
template <>
struct Device<Float16> {
    using type = __half;
};

TP_INLINE float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
TP_INLINE float widen(__half x) { return __half2float(x); }
template <>
TP_INLINE __nv_bfloat16 narrow<__nv_bfloat16, float>(float x) {
    return __float2bfloat16_rn(x);
}
template <>
TP_INLINE __half narrow<__half, float>(float x) {
    return __float2half_rn(x);
}
#else
inline uint32_t float_bits(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    return bits;
}

inline float bits_float(uint32_t bits) {
    float x;
    std::memcpy(&x, &bits, sizeof(x));
    return x;
}

inline float widen(BFloat16 x) { return bits_float(uint32_t(x.bits) << 16); }

inline float widen(Float16 x) {
    const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
    const uint32_t exponent = (x.bits >> 10) & 0x1fu, mantissa = x.bits & 0x3ffu;
    if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | mantissa << 13);  // inf, NaN
    if (exponent == 0) {                                                          // ±0, subnormal: mantissa·2⁻²⁴
        const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return bits_float(sign | (exponent + 112) << 23 | mantissa << 13);  // rebias 15 → 127
}

template <>
inline BFloat16 narrow<BFloat16, float>(float x) {
    const uint32_t bits = float_bits(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>(bits >> 16 | 0x40u)};  // NaN, quiet
    const uint32_t rounded = bits + 0x7fffu + (bits >> 16 & 1u);  // ties to the even upper half
    return {static_cast<uint16_t>(rounded >> 16)};
}

template <>
inline Float16 narrow<Float16, float>(float x) {
    const uint32_t bits = float_bits(x);
    const uint16_t sign = static_cast<uint16_t>(bits >> 16 & 0x8000u);
    const uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u | (magnitude >> 13 & 0x3ffu))};
    if (magnitude >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // ≥ 65520: infinity
    if (magnitude >= 0x38800000u) {  // normal: rebias 127 → 15, round the 13 dropped bits
        const uint32_t rebiased = magnitude - 0x38000000u;
        return {static_cast<uint16_t>(sign | (rebiased + 0xfffu + (rebiased >> 13 & 1u)) >> 13)};
    }
    // Subnormal (or zero): the significand in units of 2⁻²⁴, rounded to nearest even.
    const int shift = 126 - static_cast<int>(magnitude >> 23);
    if (shift > 24) return {sign};
    const uint32_t significand = (magnitude & 0x7fffffu) | 0x800000u;
    uint32_t units = significand >> shift;
    const uint32_t rest = significand & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (units & 1u))) ++units;
    return {static_cast<uint16_t>(sign | units)};
}
#endif

template <typename S>
using device_t = typename Device<S>::type;

// A launcher's pointer as the kernels' device type.
template <typename S>
device_t<S>* device_ptr(S* p) {
    return reinterpret_cast<device_t<S>*>(p);
}
template <typename S>
const device_t<S>* device_ptr(const S* p) {
    return reinterpret_cast<const device_t<S>*>(p);
}

}  // namespace tensor_peft::cuda

// The (storage, compute) type pairs every launcher is compiled for: float and double
// computing in their own precision, the 16-bit storage types in float. INSTANTIATE(S, T)
// is expanded once per pair (the explicit instantiations of a .cu file's launchers).
#define TP_FOR_EACH_STORAGE(INSTANTIATE) \
    INSTANTIATE(float, float)            \
    INSTANTIATE(double, double)          \
    INSTANTIATE(BFloat16, float)         \
    INSTANTIATE(Float16, float)
