// Shared by the CPU (g++) and CUDA (nvcc) kernels: header-only math is written once,
// marked TP_HD, and compiled for both the host and the device.
#pragma once

// TP_RESTRICT: the pointer is the only way to reach its data in this function, so the
// compiler may keep values in registers and vectorize (nvcc and g++ both accept it).
#define TP_RESTRICT __restrict__

// TP_UNROLL: unroll the next loop fully when its length is known at compile time.
#if defined(__CUDACC__)
#define TP_HD __host__ __device__
#define TP_INLINE __host__ __device__ __forceinline__
#define TP_UNROLL _Pragma("unroll")
#else
#define TP_HD
#define TP_INLINE inline
#define TP_UNROLL _Pragma("GCC unroll 16")
#endif

// CPU hot loops are compiled once per instruction set and picked when the module loads
// (GCC function multi-versioning), so the safe default -march still gets AVX2/AVX-512
// code on machines that have it. `flatten` inlines every call inside them: a callee left
// out of line (the shared math of these headers) would be compiled once, for the default.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define TP_CPU_CLONES __attribute__((flatten, target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TP_CPU_CLONES
#endif

namespace tensor_peft {}  // kernels' shared math lives in this namespace
