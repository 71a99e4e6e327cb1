// The matrix exponential and its Fréchet derivative by scaling and squaring with Padé
// approximants (Higham 2005; the derivative by Al-Mohy & Higham 2009), shared by the CPU
// and CUDA kernels. One call handles one n×n row-major matrix X and, optionally, a
// direction E (or one such pair per SIMD lane, see Lanes): it returns exp(X) and L(X, E),
// the Fréchet derivative of exp at X applied to E. The pair is exp of the block matrix
// [[X, E], [0, X]] = [[exp(X), L(X, E)], [0, exp(X)]], computed on the blocks directly:
// each product of such block matrices costs three n×n products, not eight.
//
// The degree m and the number of squarings s come from the 1-norm of each matrix X and
// the θ_m of the arithmetic's precision T: m ∈ {3, 5, 7, 9, 13} in double, m ∈ {3, 5, 7}
// in float; the truncation error is then below T's unit roundoff. A non-finite norm gives
// NaN everywhere; a finite one needs at most ~1030 squarings (~130 in float), never a hang.
#pragma once

#include <cmath>
#include <cstdint>

#include "tensor_peft/common.h"
#include "tensor_peft/expm_linalg.h"

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

// Values V of workspace `exp_and_frechet` needs for an n×n matrix (plus n Index pivots).
TP_INLINE int64_t workspace_size(int64_t n) { return 18 * n * n; }

// ‖M‖₁, the largest column sum of the n×n matrix M (per lane), NaN if any entry is;
// summed in V, which may be wider than M's type S.
template <typename V, typename S = V>
TP_INLINE V one_norm(const S* M, int n) {
    using Lane = Lanes<V>;
    V norm = V{};
    for (int j = 0; j < n; ++j) {
        V column = V{};
        for (int i = 0; i < n; ++i) column += Lane::magnitude(V(M[i * n + j]));
        norm = Lane::select((column > norm) | (column != column), column, norm);
    }
    return norm;
}

// The backward scales the gradient Γ by 2^−shift to ‖Γ‖₁ ≤ 1 and its result back by
// 2^shift (exact: powers of two), so a large gradient costs no extra squarings. The norm
// is summed in double, where a float gradient cannot overflow; shift = 0 for ‖Γ‖₁ ≤ 1
// and for a non-finite norm.
template <typename S>
TP_INLINE int gradient_shift(const S* grad, int n) {
    const double norm = one_norm<double>(grad, n);
    return norm > 1 && norm - norm == 0 ? static_cast<int>(ceil(log2(norm))) : 0;
}

// exp(X) into `expX` and, when E is given, L(X, E) into `L`. X and E are the caller's
// copies and are scaled in place; `work` holds workspace_size(n) values, `pivots` n.
// With several lanes, the degree m is the one the largest finite norm among them needs
// and each lane takes its own number of squarings: a lane is never squared more often
// than its own norm asks (overscaling would cost accuracy), a non-finite lane gives NaN
// and leaves the others as they are. In a team, X and E must be complete (synced) on
// entry; on return every entry of expX and L is written and synced.
template <typename V, int N = 0, typename Team = Serial>
TP_HD void exp_and_frechet(V* X, V* E, V* expX, V* L, int n_, V* work, typename Lanes<V>::Index* pivots,
                           const Team& team = Team()) {
    using Lane = Lanes<V>;
    using T = typename Lane::Scalar;
    const int n = size<N>(n_);
    const int nn = n * n;
    const bool derivative = E != nullptr;
    V* X2 = work;
    V* dX2 = X2 + nn;
    V* X4 = dX2 + nn;
    V* dX4 = X4 + nn;
    V* X6 = dX4 + nn;
    V* dX6 = X6 + nn;
    V* X8 = dX6 + nn;
    V* dX8 = X8 + nn;
    V* W1 = dX8 + nn;
    V* dW1 = W1 + nn;
    V* W2 = dW1 + nn;
    V* dW2 = W2 + nn;
    V* U = dW2 + nn;
    V* dU = U + nn;
    V* Vm = dU + nn;
    V* dV = Vm + nn;
    V* scratch = dV + nn;
    V* scratch2 = scratch + nn;

    // ‖X‖₁, the largest column sum (NaN if any entry is). The Fréchet derivative needs no
    // more than exp(X) does: the same m and s bound its truncation error too (Al-Mohy &
    // Higham 2009, §6).
    // Each thread of a team reads all of X for the norm, the same in every thread.
    V norm = one_norm<V>(X, n);
    team.sync();
    const auto finite = norm - norm == V{};  // no NaN or inf in the lane's matrix
    const int first = team.rank(), step = team.size();  // this thread's entries: first, first + step, …
    if (!Lane::any(finite)) {
        for (int i = first; i < nn; i += step) {
            expX[i] = Lane::broadcast(T(NAN));
            if (derivative) L[i] = Lane::broadcast(T(NAN));
        }
        team.sync();
        return;
    }
    const bool all_finite = Lane::all(finite);
    if (!all_finite) {  // such a lane runs on zeros and gives NaN at the end
        norm = Lane::select(finite, norm, V{});
        for (int i = first; i < nn; i += step) {
            X[i] = Lane::select(finite, X[i], V{});
            if (derivative) E[i] = Lane::select(finite, E[i], V{});
        }
        team.sync();
    }
    T largest = 0;
    for (int l = 0; l < Lane::count; ++l) {
        const T lane_norm = Lane::lane(norm, l);
        if (lane_norm > largest) largest = lane_norm;
    }
    const bool single = sizeof(T) == 4;
    const int last = single ? 2 : 4;
    int choice = 0;
    while (choice < last && largest > T(theta(single, choice))) ++choice;
    const T bound = T(theta(single, choice));
    // Each lane's squarings s, the smallest with norm/2^s ≤ θ_m, and X, E scaled by 2^−s.
    V down = Lane::broadcast(T(1)), squarings = V{};
    int most = 0;
    for (int l = 0; l < Lane::count; ++l) {
        const T lane_norm = Lane::lane(norm, l);
        if (!(lane_norm > bound)) continue;
        int exponent;
        const T mantissa = frexp(lane_norm / bound, &exponent);  // norm/θ = mantissa·2^exponent
        const int s = mantissa == T(0.5) ? exponent - 1 : exponent;
        Lane::set_lane(down, l, ldexp(T(1), -s));
        Lane::set_lane(squarings, l, T(s));
        most = s > most ? s : most;
    }
    if (most > 0) {
        for (int i = first; i < nn; i += step) {
            X[i] *= down;
            if (derivative) E[i] *= down;
        }
        team.sync();
    }
    const V* dX = derivative ? E : nullptr;
    V* dX2p = derivative ? dX2 : nullptr;
    V* dX4p = derivative ? dX4 : nullptr;
    V* dX6p = derivative ? dX6 : nullptr;
    V* dX8p = derivative ? dX8 : nullptr;
    const int m = degree(choice);
    double b[14];
    pade_coefficients(m, b);
    block_matmul<V, N>(X, dX, X, dX, X2, dX2p, scratch, n, team);
    if (m >= 5) block_matmul<V, N>(X2, dX2p, X2, dX2p, X4, dX4p, scratch, n, team);
    if (m >= 7) block_matmul<V, N>(X4, dX4p, X2, dX2p, X6, dX6p, scratch, n, team);
    if (m == 9) block_matmul<V, N>(X4, dX4p, X4, dX4p, X8, dX8p, scratch, n, team);
    // U = X·Σ b_odd X^(2k), V = Σ b_even X^(2k); for m = 13 with W = X6·(b13 X6 + b11 X4 +
    // b9 X2) + (b7 X6 + b5 X4 + b3 X2 + b1 I) and V = X6·(b12 X6 + b10 X4 + b8 X2) + (...)
    const V* powers[4] = {X2, X4, X6, X8};
    const V* dpowers[4] = {dX2, dX4, dX6, dX8};
    if (m < 13) {
        const int terms = (m - 1) / 2;  // powers X2 … X^(m−1)
        double odd[4], even[4];
        for (int k = 0; k < terms; ++k) {
            odd[k] = b[2 * k + 3];
            even[k] = b[2 * k + 2];
        }
        combine<V, N>(W1, n, b[1], powers, odd, terms, team);  // Σ b_odd X^(2k), X^0 = I
        combine<V, N>(Vm, n, b[0], powers, even, terms, team);
        if (derivative) {
            combine<V, N>(dW1, n, 0, dpowers, odd, terms, team);
            combine<V, N>(dV, n, 0, dpowers, even, terms, team);
        }
        block_matmul<V, N>(X, dX, W1, derivative ? dW1 : nullptr, U, derivative ? dU : nullptr, scratch, n, team);
    } else {
        const double c1[3] = {b[9], b[11], b[13]}, c2[3] = {b[3], b[5], b[7]};
        const double c3[3] = {b[8], b[10], b[12]}, c4[3] = {b[2], b[4], b[6]};
        combine<V, N>(W1, n, 0, powers, c1, 3, team);
        combine<V, N>(W2, n, b[1], powers, c2, 3, team);
        if (derivative) {
            combine<V, N>(dW1, n, 0, dpowers, c1, 3, team);
            combine<V, N>(dW2, n, 0, dpowers, c2, 3, team);
        }
        // W = X6·W1 + W2 (into scratch2 / dV as temporaries), U = X·W
        block_matmul<V, N>(X6, dX6p, W1, derivative ? dW1 : nullptr, scratch2, derivative ? dV : nullptr, scratch, n,
                           team);
        for (int i = first; i < nn; i += step) {
            scratch2[i] += W2[i];
            if (derivative) dV[i] += dW2[i];
        }
        team.sync();
        block_matmul<V, N>(X, dX, scratch2, derivative ? dV : nullptr, U, derivative ? dU : nullptr, scratch, n, team);
        combine<V, N>(W1, n, 0, powers, c3, 3, team);
        combine<V, N>(W2, n, b[0], powers, c4, 3, team);
        if (derivative) {
            combine<V, N>(dW1, n, 0, dpowers, c3, 3, team);
            combine<V, N>(dW2, n, 0, dpowers, c4, 3, team);
        }
        block_matmul<V, N>(X6, dX6p, W1, derivative ? dW1 : nullptr, Vm, derivative ? dV : nullptr, scratch, n, team);
        for (int i = first; i < nn; i += step) {
            Vm[i] += W2[i];
            if (derivative) dV[i] += dW2[i];
        }
        team.sync();
    }
    // r_m = (V − U)⁻¹(V + U); its derivative (V − U)⁻¹[(dV + dU) − (dV − dU)·r_m]
    V* P = W1;
    V* Q = W2;
    V* dP = derivative ? dW1 : nullptr;
    V* dQ = derivative ? dW2 : nullptr;
    for (int i = first; i < nn; i += step) {
        P[i] = Vm[i] + U[i];
        Q[i] = Vm[i] - U[i];
        if (derivative) {
            dP[i] = dV[i] + dU[i];
            dQ[i] = dV[i] - dU[i];
        }
    }
    team.sync();
    solve<V, N>(Q, P, dQ, dP, scratch, pivots, n, team);
    // Squarings of the block matrix, (R, dR) <- (R·R, R·dR + dR·R), in the lanes that
    // still need one (with one lane: every time, by swapping pointers).
    V* R = P;
    V* dR = dP;
    V* next = U;
    V* dnext = derivative ? dU : nullptr;
    for (int k = 0; k < most; ++k) {
        block_matmul<V, N>(R, dR, R, dR, next, dnext, scratch, n, team);
        const auto squaring = Lane::broadcast(T(k)) < squarings;
        if (Lane::all(squaring)) {
            V* t = R;
            R = next;
            next = t;
            t = dR;
            dR = dnext;
            dnext = t;
        } else {
            for (int i = first; i < nn; i += step) {
                R[i] = Lane::select(squaring, next[i], R[i]);
                if (derivative) dR[i] = Lane::select(squaring, dnext[i], dR[i]);
            }
            team.sync();
        }
    }
    for (int i = first; i < nn; i += step) {
        expX[i] = R[i];
        if (derivative) L[i] = dR[i];
    }
    if (!all_finite)
        for (int i = first; i < nn; i += step) {
            expX[i] = Lane::select(finite, expX[i], Lane::broadcast(T(NAN)));
            if (derivative) L[i] = Lane::select(finite, L[i], Lane::broadcast(T(NAN)));
        }
    team.sync();
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
