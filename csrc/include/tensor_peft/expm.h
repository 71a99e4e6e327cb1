// The matrix exponential and its Fréchet derivative by scaling and squaring with Padé
// approximants (Higham 2005; the derivative by Al-Mohy & Higham 2009), shared by the CPU
// and CUDA kernels. One call handles one n×n row-major matrix X and, optionally, a
// direction E: it returns exp(X) and L(X, E), the Fréchet derivative of exp at X applied
// to E. The pair is exp of the block matrix [[X, E], [0, X]] = [[exp(X), L(X, E)],
// [0, exp(X)]], computed on the blocks directly: each product of such block matrices
// costs three n×n products, not eight.
//
// The degree m and the number of squarings s come from the 1-norm of each matrix X and
// the θ_m of the arithmetic's precision T: m ∈ {3, 5, 7,
// 9, 13} in double, m ∈ {3, 5, 7} in float; the truncation error is then below T's unit
// roundoff. A non-finite norm gives NaN everywhere; a finite one needs at most ~1030
// squarings (~130 in float), never a hang.
#pragma once

#include <cmath>
#include <cstdint>

#include "tensor_peft/common.h"

namespace tensor_peft::expm {

// Higham 2005, Table 2.3: θ_m for the m-th degree (choice 0..4: m = 3, 5, 7, 9, 13) in
// double precision, and for m = 3, 5, 7 in single precision. (Functions, not global
// arrays: device code reads them too.)
TP_INLINE double theta(bool single, int choice) {
    const double in_double[5] = {1.495585217958292e-2, 2.539398330063230e-1, 9.504178996162932e-1,
                                 2.097847961257068e0, 5.371920351148152e0};
    const double in_single[3] = {4.258730016922831e-1, 1.880152677804762e0, 3.925724783138660e0};
    return single ? in_single[choice] : in_double[choice];
}

TP_INLINE int degree(int choice) { return choice < 3 ? 3 + 2 * choice : (choice == 3 ? 9 : 13); }

// b_j of the [m/m] Padé approximant of exp, m = 3, 5, 7, 9, 13, into b[0..m].
TP_INLINE void pade_coefficients(int m, double* b) {
    const double p3[4] = {120., 60., 12., 1.};
    const double p5[6] = {30240., 15120., 3360., 420., 30., 1.};
    const double p7[8] = {17297280., 8648640., 1995840., 277200., 25200., 1512., 56., 1.};
    const double p9[10] = {17643225600., 8821612800., 2075673600., 302702400., 30270240.,
                           2162160., 110880., 3960., 90., 1.};
    const double p13[14] = {64764752532480000., 32382376266240000., 7771770303897600.,
                            1187353796428800., 129060195264000., 10559470521600.,
                            670442572800., 33522128640., 1323241920., 40840800.,
                            960960., 16380., 182., 1.};
    const double* source = m == 3 ? p3 : m == 5 ? p5 : m == 7 ? p7 : m == 9 ? p9 : p13;
    for (int j = 0; j <= m; ++j) b[j] = source[j];
}

// Doubles of workspace `exp_and_frechet` needs for an n×n matrix (plus n ints of pivots).
TP_INLINE int64_t workspace_size(int64_t n) { return 20 * n * n; }

// Every function takes the size n at run time or, for speed on small matrices, as the
// template argument N (N = 0: use n): loops of a compile-time length unroll and vectorize.
template <int N>
TP_INLINE int size(int n) {
    return N > 0 ? N : n;
}

// Row operations below work on `row`: with a compile-time size N it is a local array the
// compiler keeps in registers (loaded and stored once), with N = 0 the matrix row itself.

// C = A·B (n×n, row-major; C must not alias A or B).
template <typename T, int N>
TP_INLINE void matmul(const T* TP_RESTRICT A, const T* TP_RESTRICT B, T* TP_RESTRICT C, int n_) {
    const int n = size<N>(n_);
    for (int i = 0; i < n; ++i) {
        T local[N > 0 ? N : 1];
        T* row = N > 0 ? local : C + i * n;
        for (int j = 0; j < n; ++j) row[j] = T(0);
        for (int k = 0; k < n; ++k) {
            const T a = A[i * n + k];
            const T* b = B + k * n;
#pragma omp simd
            for (int j = 0; j < n; ++j) row[j] += a * b[j];
        }
        if (N > 0)
            for (int j = 0; j < n; ++j) C[i * n + j] = row[j];
    }
}

// The block product [[A, dA], [0, A]]·[[B, dB], [0, B]] = [[A·B, A·dB + dA·B], [0, A·B]];
// `scratch` holds n² values. Without the derivative (dA null) only C = A·B.
template <typename T, int N>
TP_INLINE void block_matmul(const T* A, const T* dA, const T* B, const T* dB, T* C, T* dC, T* scratch, int n_) {
    const int n = size<N>(n_);
    matmul<T, N>(A, B, C, n);
    if (!dA) return;
    matmul<T, N>(A, dB, dC, n);
    matmul<T, N>(dA, B, scratch, n);
    for (int i = 0; i < n * n; ++i) dC[i] += scratch[i];
}

// out = Σ_k c[k]·M_k over the given powers (M_0 = I when `identity` is nonzero).
template <typename T, int N>
TP_INLINE void combine(T* out, int n_, T identity, const T* const* powers, const double* coefficients, int count) {
    const int n = size<N>(n_);
    for (int i = 0; i < n * n; ++i) out[i] = T(0);
    if (identity != T(0))
        for (int i = 0; i < n; ++i) out[i * n + i] = identity;
    for (int p = 0; p < count; ++p)
        for (int i = 0; i < n * n; ++i) out[i] += T(coefficients[p]) * powers[p][i];
}

// B := Q⁻¹·B (all n columns) with the LU factors of Q in place and its row swaps.
template <typename T, int N>
TP_INLINE void lu_substitute(const T* Q, const int* pivots, T* B, int n_) {
    const int n = size<N>(n_);
    for (int k = 0; k < n; ++k)
        if (pivots[k] != k)
            for (int j = 0; j < n; ++j) {
                const T t = B[k * n + j];
                B[k * n + j] = B[pivots[k] * n + j];
                B[pivots[k] * n + j] = t;
            }
    for (int i = 0; i < n; ++i) {  // forward substitution with the unit lower factor
        T local[N > 0 ? N : 1];
        T* row = N > 0 ? local : B + i * n;
        if (N > 0)
            for (int j = 0; j < n; ++j) row[j] = B[i * n + j];
        for (int k = 0; k < i; ++k) {
            const T l = Q[i * n + k];
            const T* b = B + k * n;
#pragma omp simd
            for (int j = 0; j < n; ++j) row[j] -= l * b[j];
        }
        if (N > 0)
            for (int j = 0; j < n; ++j) B[i * n + j] = row[j];
    }
    for (int i = n - 1; i >= 0; --i) {  // back substitution with the upper factor
        T local[N > 0 ? N : 1];
        T* row = N > 0 ? local : B + i * n;
        if (N > 0)
            for (int j = 0; j < n; ++j) row[j] = B[i * n + j];
        for (int k = i + 1; k < n; ++k) {
            const T u = Q[i * n + k];
            const T* b = B + k * n;
#pragma omp simd
            for (int j = 0; j < n; ++j) row[j] -= u * b[j];
        }
        const T d = Q[i * n + i];
        for (int j = 0; j < n; ++j) B[i * n + j] = row[j] / d;
    }
}

// Solves Q·R = P and Q·dR = dP − dQ·R for R, dR by LU with partial pivoting of Q
// (overwritten); P becomes R and dP becomes dR. dP may be null (no derivative).
template <typename T, int N>
TP_INLINE void solve(T* Q, T* P, T* dQ, T* dP, T* scratch, int* pivots, int n_) {
    const int n = size<N>(n_);
    for (int k = 0; k < n; ++k) {
        int pivot = k;
        for (int i = k + 1; i < n; ++i)
            if (fabs(Q[i * n + k]) > fabs(Q[pivot * n + k])) pivot = i;
        pivots[k] = pivot;
        if (pivot != k)
            for (int j = 0; j < n; ++j) {
                const T t = Q[k * n + j];
                Q[k * n + j] = Q[pivot * n + j];
                Q[pivot * n + j] = t;
            }
        for (int i = k + 1; i < n; ++i) {
            const T factor = Q[i * n + k] / Q[k * n + k];
            Q[i * n + k] = factor;
            for (int j = k + 1; j < n; ++j) Q[i * n + j] -= factor * Q[k * n + j];
        }
    }
    lu_substitute<T, N>(Q, pivots, P, n);
    if (!dP) return;
    matmul<T, N>(dQ, P, scratch, n);
    for (int i = 0; i < n * n; ++i) dP[i] -= scratch[i];
    lu_substitute<T, N>(Q, pivots, dP, n);
}

// exp(X) into `expX` and, when E is given, L(X, E) into `L`. X, E are read as S (float or
// double), converted to T; `work` holds workspace_size(n) values of T, `pivots` n ints.
template <typename T, typename S, int N = 0>
TP_HD void exp_and_frechet(const S* X_in, const S* E_in, T* expX, T* L, int n_, T* work, int* pivots) {
    const int n = size<N>(n_);
    const int nn = n * n;
    const bool derivative = E_in != nullptr;
    T* X = work;
    T* E = X + nn;
    T* X2 = E + nn;
    T* dX2 = X2 + nn;
    T* X4 = dX2 + nn;
    T* dX4 = X4 + nn;
    T* X6 = dX4 + nn;
    T* dX6 = X6 + nn;
    T* X8 = dX6 + nn;
    T* dX8 = X8 + nn;
    T* W1 = dX8 + nn;
    T* dW1 = W1 + nn;
    T* W2 = dW1 + nn;
    T* dW2 = W2 + nn;
    T* U = dW2 + nn;
    T* dU = U + nn;
    T* V = dU + nn;
    T* dV = V + nn;
    T* scratch = dV + nn;
    T* scratch2 = scratch + nn;

    // ‖X‖₁, the largest column sum. The Fréchet derivative needs no more than exp(X) does:
    // the same m and s bound its truncation error too (Al-Mohy & Higham 2009, §6).
    T norm = 0;
    for (int j = 0; j < n; ++j) {
        T column = 0;
        for (int i = 0; i < n; ++i) {
            X[i * n + j] = T(X_in[i * n + j]);
            column += fabs(X[i * n + j]);
            if (derivative) E[i * n + j] = T(E_in[i * n + j]);
        }
        norm = column > norm || column != column ? column : norm;
    }
    if (!(norm - norm == T(0))) {  // NaN or inf somewhere
        for (int i = 0; i < nn; ++i) {
            expX[i] = T(NAN);
            if (derivative) L[i] = T(NAN);
        }
        return;
    }
    const bool single = sizeof(T) == 4;
    const int last = single ? 2 : 4;
    int choice = 0;
    while (choice < last && norm > T(theta(single, choice))) ++choice;
    int squarings = 0;
    if (norm > T(theta(single, last))) {
        int exponent;
        const T mantissa = frexp(norm / T(theta(single, last)), &exponent);  // norm/θ = mantissa·2^exponent
        squarings = mantissa == T(0.5) ? exponent - 1 : exponent;   // smallest s with norm/2^s ≤ θ
        const T down = ldexp(T(1), -squarings);
        for (int i = 0; i < nn; ++i) {
            X[i] *= down;
            if (derivative) E[i] *= down;
        }
    }
    const T* dX = derivative ? E : nullptr;
    T* dX2p = derivative ? dX2 : nullptr;
    T* dX4p = derivative ? dX4 : nullptr;
    T* dX6p = derivative ? dX6 : nullptr;
    T* dX8p = derivative ? dX8 : nullptr;
    const int m = degree(choice);
    double b[14];
    pade_coefficients(m, b);
    block_matmul<T, N>(X, dX, X, dX, X2, dX2p, scratch, n);
    if (m >= 5) block_matmul<T, N>(X2, dX2p, X2, dX2p, X4, dX4p, scratch, n);
    if (m >= 7) block_matmul<T, N>(X4, dX4p, X2, dX2p, X6, dX6p, scratch, n);
    if (m == 9) block_matmul<T, N>(X4, dX4p, X4, dX4p, X8, dX8p, scratch, n);
    // U = X·Σ b_odd X^(2k), V = Σ b_even X^(2k); for m = 13 with W = X6·(b13 X6 + b11 X4 +
    // b9 X2) + (b7 X6 + b5 X4 + b3 X2 + b1 I) and V = X6·(b12 X6 + b10 X4 + b8 X2) + (...)
    const T* powers[4] = {X2, X4, X6, X8};
    const T* dpowers[4] = {dX2, dX4, dX6, dX8};
    if (m < 13) {
        const int terms = (m - 1) / 2;  // powers X2 … X^(m−1)
        double odd[4], even[4];
        for (int k = 0; k < terms; ++k) {
            odd[k] = b[2 * k + 3];
            even[k] = b[2 * k + 2];
        }
        combine<T, N>(W1, n, T(b[1]), powers, odd, terms);  // Σ b_odd X^(2k), X^0 = I
        combine<T, N>(V, n, T(b[0]), powers, even, terms);
        if (derivative) {
            combine<T, N>(dW1, n, T(0), dpowers, odd, terms);
            combine<T, N>(dV, n, T(0), dpowers, even, terms);
        }
        block_matmul<T, N>(X, dX, W1, derivative ? dW1 : nullptr, U, derivative ? dU : nullptr, scratch, n);
    } else {
        const double c1[3] = {b[9], b[11], b[13]}, c2[3] = {b[3], b[5], b[7]};
        const double c3[3] = {b[8], b[10], b[12]}, c4[3] = {b[2], b[4], b[6]};
        combine<T, N>(W1, n, T(0), powers, c1, 3);
        combine<T, N>(W2, n, T(b[1]), powers, c2, 3);
        if (derivative) {
            combine<T, N>(dW1, n, T(0), dpowers, c1, 3);
            combine<T, N>(dW2, n, T(0), dpowers, c2, 3);
        }
        // W = X6·W1 + W2 (into scratch2 / dU as temporaries), U = X·W
        block_matmul<T, N>(X6, dX6p, W1, derivative ? dW1 : nullptr, scratch2, derivative ? dV : nullptr, scratch, n);
        for (int i = 0; i < nn; ++i) {
            scratch2[i] += W2[i];
            if (derivative) dV[i] += dW2[i];
        }
        block_matmul<T, N>(X, dX, scratch2, derivative ? dV : nullptr, U, derivative ? dU : nullptr, scratch, n);
        combine<T, N>(W1, n, T(0), powers, c3, 3);
        combine<T, N>(W2, n, T(b[0]), powers, c4, 3);
        if (derivative) {
            combine<T, N>(dW1, n, T(0), dpowers, c3, 3);
            combine<T, N>(dW2, n, T(0), dpowers, c4, 3);
        }
        block_matmul<T, N>(X6, dX6p, W1, derivative ? dW1 : nullptr, V, derivative ? dV : nullptr, scratch, n);
        for (int i = 0; i < nn; ++i) {
            V[i] += W2[i];
            if (derivative) dV[i] += dW2[i];
        }
    }
    // r_m = (V − U)⁻¹(V + U); its derivative (V − U)⁻¹[(dV + dU) − (dV − dU)·r_m]
    T* P = W1;
    T* Q = W2;
    T* dP = derivative ? dW1 : nullptr;
    T* dQ = derivative ? dW2 : nullptr;
    for (int i = 0; i < nn; ++i) {
        P[i] = V[i] + U[i];
        Q[i] = V[i] - U[i];
        if (derivative) {
            dP[i] = dV[i] + dU[i];
            dQ[i] = dV[i] - dU[i];
        }
    }
    solve<T, N>(Q, P, dQ, dP, scratch, pivots, n);
    // s squarings of the block matrix: (R, dR) <- (R·R, R·dR + dR·R)
    T* R = P;
    T* dR = dP;
    T* next = U;
    T* dnext = derivative ? dU : nullptr;
    for (int k = 0; k < squarings; ++k) {
        block_matmul<T, N>(R, dR, R, dR, next, dnext, scratch, n);
        T* t = R;
        R = next;
        next = t;
        if (derivative) {
            t = dR;
            dR = dnext;
            dnext = t;
        }
    }
    for (int i = 0; i < nn; ++i) {
        expX[i] = R[i];
        if (derivative) L[i] = dR[i];
    }
}

// Host side: Kernel<N>::run(args...) with N the compile-time size for n = 1–8 and 16 (the
// sizes LieRA's blocks take most), N = 0 (run-time n) otherwise.
template <template <int> class Kernel, typename... Args>
void with_size(int n, Args... args) {
    switch (n) {
        case 1: return Kernel<1>::run(args...);
        case 2: return Kernel<2>::run(args...);
        case 3: return Kernel<3>::run(args...);
        case 4: return Kernel<4>::run(args...);
        case 5: return Kernel<5>::run(args...);
        case 6: return Kernel<6>::run(args...);
        case 7: return Kernel<7>::run(args...);
        case 8: return Kernel<8>::run(args...);
        case 16: return Kernel<16>::run(args...);
        default: return Kernel<0>::run(args...);
    }
}

}  // namespace tensor_peft::expm
