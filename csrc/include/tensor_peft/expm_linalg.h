// The dense n×n linear algebra of the matrix exponential (tensor_peft/expm.h): products,
// block products, linear combinations and an LU solve with partial pivoting, on one
// matrix or one per SIMD lane (Lanes) and computed by one thread or a team of them (Serial,
// CUDA's teams). Shared by the CPU and CUDA kernels; every entry is computed with the same
// operations in the same order whichever form runs it.
#pragma once

#include <cmath>

#include "tensor_peft/common.h"

namespace tensor_peft::expm {

// How the math below holds its values. One matrix per call (a CUDA thread; large n on the
// CPU): V is float or double. One matrix per SIMD lane (small n on the CPU, see
// tensor_peft/lanes.h): V is a vector whose lane l holds that entry of the l-th matrix, so
// every operation below runs on all of them at once. The few steps that differ between
// lanes (a pivot, the number of squarings) go through `select` on a lane mask.
template <typename V>
struct Lanes {
    using Scalar = V;
    using Mask = bool;
    using Index = int;  // a row number in each lane
    static constexpr int count = 1;
    TP_INLINE static V magnitude(V x) { return fabs(x); }
    template <typename U>
    TP_INLINE static U select(Mask mask, U if_true, U if_false) {
        return mask ? if_true : if_false;
    }
    TP_INLINE static bool any(Mask mask) { return mask; }
    TP_INLINE static bool all(Mask mask) { return mask; }
    TP_INLINE static V broadcast(Scalar x) { return x; }
    TP_INLINE static Index index(int i) { return i; }
    TP_INLINE static Scalar lane(V x, int) { return x; }
    TP_INLINE static void set_lane(V& x, int, Scalar value) { x = value; }
};

// Who computes one matrix: the steps below split their entries (or columns) among the
// team's size() threads, thread rank() taking every size()-th one from rank(), and end
// with sync(), after which every thread sees every entry. Serial is one thread (or one
// SIMD vector of lanes) for the whole matrix: the CPU's team, whose loops are the plain
// ones. CUDA's teams (a warp or part of one, or a block; csrc/cuda/expm.cu) have
// `serial` false and take the entry-parallel forms of matmul and solve, which compute
// each entry with the same operations in the same order as the serial forms.
struct Serial {
    static constexpr bool serial = true;
    TP_INLINE int rank() const { return 0; }
    TP_INLINE int size() const { return 1; }
    TP_INLINE void sync() const {}
};

// Every function takes the size n at run time or, for speed on small matrices, as the
// template argument N (N = 0: use n): loops of a compile-time length unroll and vectorize.
template <int N>
TP_INLINE int size(int n) {
    return N > 0 ? N : n;
}

// Row operations below work on `row`: with a compile-time size N it is a local array the
// compiler keeps in registers (loaded and stored once), with N = 0 the matrix row itself.

// row[j] += a·b[j] for j < n: one SIMD loop over j for one matrix, an unrolled loop of
// lane vectors (already SIMD) otherwise.
template <typename V, int N>
TP_INLINE void add_scaled(V* TP_RESTRICT row, V a, const V* TP_RESTRICT b, int n_) {
    const int n = size<N>(n_);
    if constexpr (Lanes<V>::count > 1) {
        TP_UNROLL
        for (int j = 0; j < n; ++j) row[j] += a * b[j];
    } else {
#pragma omp simd
        for (int j = 0; j < n; ++j) row[j] += a * b[j];
    }
}

// C = A·B (n×n, row-major; C must not alias A or B). Each entry is Σ_k A[i,k]·B[k,j]
// summed in k order: serially a row at a time (SIMD over j), in a team an entry per thread.
template <typename V, int N, typename Team>
TP_INLINE void matmul(const V* TP_RESTRICT A, const V* TP_RESTRICT B, V* TP_RESTRICT C, int n_, const Team& team) {
    const int n = size<N>(n_);
    if constexpr (Team::serial) {
        for (int i = 0; i < n; ++i) {
            V local[N > 0 ? N : 1];
            V* row = N > 0 ? local : C + i * n;
            for (int j = 0; j < n; ++j) row[j] = V{};
            for (int k = 0; k < n; ++k) add_scaled<V, N>(row, A[i * n + k], B + k * n, n);
            if (N > 0)
                for (int j = 0; j < n; ++j) C[i * n + j] = row[j];
        }
    } else {
        for (int e = team.rank(); e < n * n; e += team.size()) {
            const int i = e / n, j = e % n;
            V sum = V{};
            for (int k = 0; k < n; ++k) sum += A[i * n + k] * B[k * n + j];
            C[e] = sum;
        }
    }
    team.sync();
}

// The block product [[A, dA], [0, A]]·[[B, dB], [0, B]] = [[A·B, A·dB + dA·B], [0, A·B]];
// `scratch` holds n² values. Without the derivative (dA null) only C = A·B.
template <typename V, int N, typename Team>
TP_INLINE void block_matmul(const V* A, const V* dA, const V* B, const V* dB, V* C, V* dC, V* scratch, int n_,
                            const Team& team) {
    const int n = size<N>(n_);
    matmul<V, N>(A, B, C, n, team);
    if (!dA) return;
    matmul<V, N>(A, dB, dC, n, team);
    matmul<V, N>(dA, B, scratch, n, team);
    for (int i = team.rank(); i < n * n; i += team.size()) dC[i] += scratch[i];
    team.sync();
}

// out = Σ_k c[k]·M_k over the given powers (M_0 = I when `identity` is nonzero).
template <typename V, int N, typename Team>
TP_INLINE void combine(V* out, int n_, double identity, const V* const* powers, const double* coefficients,
                       int count, const Team& team) {
    using Scalar = typename Lanes<V>::Scalar;
    const int n = size<N>(n_);
    Scalar c[4];
    for (int p = 0; p < count; ++p) c[p] = Scalar(coefficients[p]);
    const V diagonal = Lanes<V>::broadcast(Scalar(identity));
    for (int i = team.rank(); i < n * n; i += team.size()) {
        V sum = V{};
        for (int p = 0; p < count; ++p) sum += c[p] * powers[p][i];
        if (identity != 0 && i % (n + 1) == 0) sum += diagonal;
        out[i] = sum;
    }
    team.sync();
}

// Swaps rows k and `pivot` of B in each lane where they differ.
template <typename V, int N>
TP_INLINE void swap_rows(V* B, int k, typename Lanes<V>::Index pivot, int n_) {
    using Lane = Lanes<V>;
    const int n = size<N>(n_);
    if (!Lane::any(pivot != Lane::index(k))) return;  // the usual case
    for (int i = k + 1; i < n; ++i) {
        const auto here = Lane::index(i) == pivot;
        if (!Lane::any(here)) continue;
        for (int j = 0; j < n; ++j) {
            const V upper = B[k * n + j], lower = B[i * n + j];
            B[k * n + j] = Lane::select(here, lower, upper);
            B[i * n + j] = Lane::select(here, upper, lower);
        }
    }
}

// B := Q⁻¹·B (all n columns) with the LU factors of Q in place and its row swaps:
// serially a row at a time; in a team each thread solves whole columns of B (the columns
// are independent systems), each entry with the same operations.
template <typename V, int N, typename Team>
TP_INLINE void lu_substitute(const V* Q, const typename Lanes<V>::Index* pivots, V* B, int n_, const Team& team) {
    const int n = size<N>(n_);
    if constexpr (Team::serial) {
        for (int k = 0; k < n; ++k) swap_rows<V, N>(B, k, pivots[k], n);
        for (int i = 0; i < n; ++i) {  // forward substitution with the unit lower factor
            V local[N > 0 ? N : 1];
            V* row = N > 0 ? local : B + i * n;
            if (N > 0)
                for (int j = 0; j < n; ++j) row[j] = B[i * n + j];
            for (int k = 0; k < i; ++k) add_scaled<V, N>(row, -Q[i * n + k], B + k * n, n);
            if (N > 0)
                for (int j = 0; j < n; ++j) B[i * n + j] = row[j];
        }
        for (int i = n - 1; i >= 0; --i) {  // back substitution with the upper factor
            V local[N > 0 ? N : 1];
            V* row = N > 0 ? local : B + i * n;
            if (N > 0)
                for (int j = 0; j < n; ++j) row[j] = B[i * n + j];
            for (int k = i + 1; k < n; ++k) add_scaled<V, N>(row, -Q[i * n + k], B + k * n, n);
            const V d = Q[i * n + i];
            for (int j = 0; j < n; ++j) B[i * n + j] = row[j] / d;
        }
    } else {
        for (int j = team.rank(); j < n; j += team.size()) {
            for (int k = 0; k < n; ++k) {
                const int pivot = pivots[k];
                if (pivot == k) continue;
                const V upper = B[k * n + j];
                B[k * n + j] = B[pivot * n + j];
                B[pivot * n + j] = upper;
            }
            for (int i = 0; i < n; ++i) {
                V value = B[i * n + j];
                for (int k = 0; k < i; ++k) value += -Q[i * n + k] * B[k * n + j];
                B[i * n + j] = value;
            }
            for (int i = n - 1; i >= 0; --i) {
                V value = B[i * n + j];
                for (int k = i + 1; k < n; ++k) value += -Q[i * n + k] * B[k * n + j];
                B[i * n + j] = value / Q[i * n + i];
            }
        }
        team.sync();
    }
}

// LU with partial pivoting of Q in place, its row swaps into `pivots`. In a team every
// thread finds the same pivot; the swap, the column of factors and the update of the
// trailing block are split among the threads.
template <typename V, int N, typename Team>
TP_INLINE void lu_factor(V* Q, typename Lanes<V>::Index* pivots, int n_, const Team& team) {
    using Lane = Lanes<V>;
    const int n = size<N>(n_);
    if constexpr (Team::serial) {
        for (int k = 0; k < n; ++k) {
            V largest = Lane::magnitude(Q[k * n + k]);
            typename Lane::Index pivot = Lane::index(k);
            for (int i = k + 1; i < n; ++i) {
                const V candidate = Lane::magnitude(Q[i * n + k]);
                const auto larger = candidate > largest;
                largest = Lane::select(larger, candidate, largest);
                pivot = Lane::select(larger, Lane::index(i), pivot);
            }
            pivots[k] = pivot;
            swap_rows<V, N>(Q, k, pivot, n);
            const V diagonal = Q[k * n + k];
            for (int i = k + 1; i < n; ++i) {
                const V factor = Q[i * n + k] / diagonal;
                Q[i * n + k] = factor;
                for (int j = k + 1; j < n; ++j) Q[i * n + j] -= factor * Q[k * n + j];
            }
        }
    } else {
        for (int k = 0; k < n; ++k) {
            V largest = Lane::magnitude(Q[k * n + k]);
            int pivot = k;
            for (int i = k + 1; i < n; ++i) {
                const V candidate = Lane::magnitude(Q[i * n + k]);
                if (candidate > largest) {
                    largest = candidate;
                    pivot = i;
                }
            }
            if (team.rank() == 0) pivots[k] = pivot;
            team.sync();  // every thread has read column k
            if (pivot != k)
                for (int j = team.rank(); j < n; j += team.size()) {
                    const V upper = Q[k * n + j];
                    Q[k * n + j] = Q[pivot * n + j];
                    Q[pivot * n + j] = upper;
                }
            team.sync();
            const V diagonal = Q[k * n + k];
            for (int i = k + 1 + team.rank(); i < n; i += team.size()) Q[i * n + k] = Q[i * n + k] / diagonal;
            team.sync();
            const int rest = n - k - 1;
            for (int e = team.rank(); e < rest * rest; e += team.size()) {
                const int i = k + 1 + e / rest, j = k + 1 + e % rest;
                Q[i * n + j] -= Q[i * n + k] * Q[k * n + j];
            }
            team.sync();
        }
    }
}

// Solves Q·R = P and Q·dR = dP − dQ·R for R, dR by LU with partial pivoting of Q
// (overwritten); P becomes R and dP becomes dR. dP may be null (no derivative).
template <typename V, int N, typename Team>
TP_INLINE void solve(V* Q, V* P, V* dQ, V* dP, V* scratch, typename Lanes<V>::Index* pivots, int n_,
                     const Team& team) {
    const int n = size<N>(n_);
    lu_factor<V, N>(Q, pivots, n, team);
    lu_substitute<V, N>(Q, pivots, P, n, team);
    if (!dP) return;
    matmul<V, N>(dQ, P, scratch, n, team);
    for (int i = team.rank(); i < n * n; i += team.size()) dP[i] -= scratch[i];
    team.sync();
    lu_substitute<V, N>(Q, pivots, dP, n, team);
}

}  // namespace tensor_peft::expm
