// CPU only: the OpenMP thread numbers (one thread when OpenMP is off), and the fixed
// chunking that keeps results bitwise identical at any thread count.
//
// Determinism: work is cut into chunks by chunk_count(), a number that depends only on
// the problem size, never on the thread count. Each chunk is computed alone, in one
// order, into its own partial result, and partials are combined in chunk order; which
// thread runs a chunk then changes nothing.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace tensor_peft::cpu {

#ifdef _OPENMP
inline int thread_number() { return omp_get_thread_num(); }
inline int max_thread_count() { return omp_get_max_threads(); }
inline void set_max_thread_count(int count) { omp_set_num_threads(count); }
#else
inline int thread_number() { return 0; }
inline int max_thread_count() { return 1; }
inline void set_max_thread_count(int) {}
#endif

// At most this many chunks: partial results (one per chunk) stay few.
constexpr int64_t kMaxChunks = 32;

// The number of chunks for `count` items of at least `grain` items each (0 for none).
inline int64_t chunk_count(int64_t count, int64_t grain) {
    return std::min(kMaxChunks, (count + grain - 1) / grain);
}

// Chunk c's items [begin, end) of `count` items in `chunks` chunks, consecutive runs.
inline void chunk_range(int64_t count, int64_t chunks, int64_t c, int64_t& begin, int64_t& end) {
    begin = count / chunks * c + std::min(c, count % chunks);
    end = begin + count / chunks + (c < count % chunks ? 1 : 0);
}

// body(c) for each chunk c in [0, chunks) on the OpenMP threads. An exception thrown by
// a call is rethrown here, on the calling thread, after every chunk has ended (one that
// escaped the parallel region would end the process).
template <typename Body>
void for_each_chunk(int64_t chunks, Body body) {
    std::exception_ptr error = nullptr;
#pragma omp parallel for schedule(dynamic, 1) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        try {
            body(c);
        } catch (...) {
#pragma omp critical(tensor_peft_chunk_error)
            if (!error) error = std::current_exception();
        }
    }
    if (error) std::rethrow_exception(error);
}

}  // namespace tensor_peft::cpu
