// CPU only: row reductions in independent partial sums. A sum kept in one vector register makes
// each add wait for the one before (the latency of an add, not its throughput, sets the
// pace); kLanes partial sums (four AVX-512 vectors of float) let the adds overlap. The
// order of the adds is fixed by the source, not by the vector width the compiler picks:
// lane l sums the entries i ≡ l mod kLanes of the whole blocks of kLanes, then the lanes are
// folded pairwise (fold_lanes), then the tail is added. The same bits on any machine.
#pragma once

#include <cstdint>

namespace tensor_peft::cpu {

constexpr int64_t kLanes = 64;

// The sum of the kLanes partial sums in `lanes`, folded halves onto halves (in place).
template <typename T>
inline T fold_lanes(T* lanes) {
    for (int64_t half = kLanes / 2; half > 0; half /= 2) {
#pragma omp simd
        for (int64_t l = 0; l < half; ++l) lanes[l] += lanes[l + half];
    }
    return lanes[0];
}

}  // namespace tensor_peft::cpu
