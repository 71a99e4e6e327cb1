// CPU only: the OpenMP thread numbers, with one thread when OpenMP is off, and a
// thread's static share of a range.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace tensor_peft::cpu {

#ifdef _OPENMP
inline int thread_number() { return omp_get_thread_num(); }
inline int thread_count() { return omp_get_num_threads(); }
inline int max_thread_count() { return omp_get_max_threads(); }
#else
inline int thread_number() { return 0; }
inline int thread_count() { return 1; }
inline int max_thread_count() { return 1; }
#endif

// This thread's share [begin, end) of `count` items: threads take runs in thread order.
inline void share(int64_t count, int64_t& begin, int64_t& end) {
    begin = count * thread_number() / thread_count();
    end = count * (thread_number() + 1) / thread_count();
}

}  // namespace tensor_peft::cpu
