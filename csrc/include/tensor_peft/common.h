// Shared by the CPU (g++) and CUDA (nvcc) kernels: header-only math is written once,
// marked TP_HD, and compiled for both the host and the device.
#pragma once

#if defined(__CUDACC__)
#define TP_HD __host__ __device__
#define TP_INLINE __host__ __device__ __forceinline__
#else
#define TP_HD
#define TP_INLINE inline
#endif

namespace tensor_peft {}  // kernels' shared math lives in this namespace
