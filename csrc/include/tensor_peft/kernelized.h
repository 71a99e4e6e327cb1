// SNELL's kernel functions κ and its sparsification, entry by entry, shared by the CPU and
// CUDA kernels, and the numbers those kernels take for a kernel and a sparsification mode
// (the bindings export them to Python as KERNEL_IDS and MODE_IDS).
//
// The kernels first reduce the embeddings of entry (j, i), each in its own loop order:
// piecewise_linear and mixture to r_h = sqrt(‖b_j^h − a_i^h‖² + eps) per chunk h and
// P = Σ_h coeff[h]·r_h; rbf to x = ‖b_j − a_i‖²; sigmoid and linear to x = b_j·a_i. The
// functions below take it from there. Mixture's softmax term needs the column statistics
// (max_j P and Σ_j exp((P − max_j P)/gamma)), which each backend gathers its own way.
#pragma once

#include <cmath>
#include <type_traits>

#include "tensor_peft/common.h"

namespace tensor_peft::kernelized {

enum Kernel : int { kPiecewise = 0, kRbf = 1, kSigmoid = 2, kLinear = 3, kMixture = 4 };
enum Mode : int { kNone = 0, kHard = 1, kSoft = 2 };

// Python's names, indexed by the numbers above.
constexpr const char* kKernelNames[] = {"piecewise_linear", "rbf", "sigmoid", "linear", "mixture"};
constexpr const char* kModeNames[] = {"none", "hard", "soft"};

// Whether the kernel is built on P (piecewise_linear, mixture), else on x.
TP_INLINE bool is_piecewise(int kernel) { return kernel == kPiecewise || kernel == kMixture; }
// Whether x is the dot product b·a (sigmoid, linear), else ‖b − a‖² (rbf).
TP_INLINE bool is_dot_product(int kernel) { return kernel == kSigmoid || kernel == kLinear; }
// Whether `backward` reads x (linear's gradient does not: the caller may skip it).
TP_INLINE bool backward_reads_x(int kernel) { return kernel != kLinear; }

// f(std::integral_constant<int, kernel>()): the kernel as a compile-time constant, so that
// a loop calling `value` or `backward` in f is compiled for that kernel alone.
template <typename F>
TP_INLINE void with_kernel(int kernel, F&& f) {
    switch (kernel) {
        case kPiecewise:
            return f(std::integral_constant<int, kPiecewise>());
        case kRbf:
            return f(std::integral_constant<int, kRbf>());
        case kSigmoid:
            return f(std::integral_constant<int, kSigmoid>());
        case kLinear:
            return f(std::integral_constant<int, kLinear>());
        default:
            return f(std::integral_constant<int, kMixture>());
    }
}

// r_h = sqrt(‖b^h − a^h‖² + eps).
template <typename T>
TP_INLINE T piecewise_root(T squares, T eps) {
    return std::sqrt(squares + eps);
}

// κ of rbf (alpha·exp(−beta x) + gamma), sigmoid (alpha·σ(beta x) + gamma) and linear (x).
template <typename T>
TP_INLINE T value(int kernel, T x, T alpha, T beta, T gamma) {
    switch (kernel) {
        case kRbf:
            return alpha * std::exp(-beta * x) + gamma;
        case kSigmoid:
            return alpha / (T(1) + std::exp(-beta * x)) + gamma;
        default:
            return x;
    }
}

// The gradient of `value` at an entry with D = ∂L/∂κ: adds D·∂κ/∂(alpha, beta, gamma) into
// d_alpha, d_beta, d_gamma and returns the entry's weight W in the embeddings' gradients (for
// x = ‖b − a‖²: ∂b_j += W·(b_j − a_i), ∂a_i −= W·(b_j − a_i), W = 2D·∂κ/∂x; for x = b·a:
// ∂b_j += W·a_i, ∂a_i += W·b_j, W = D·∂κ/∂x). The products are formed in S: the entry's
// type on the CPU, double on CUDA. (Each kernel adds in its own branch: an add after the
// branches join could not be fused with the product.)
template <typename S, typename T>
TP_INLINE T backward(int kernel, T D, T x, T alpha, T beta, double& d_alpha, double& d_beta, double& d_gamma) {
    switch (kernel) {
        case kRbf: {
            const T e = std::exp(-beta * x);
            d_alpha += S(D) * S(e);
            d_beta -= S(D) * S(alpha) * S(x) * S(e);
            d_gamma += S(D);
            return D * T(-2) * alpha * beta * e;
        }
        case kSigmoid: {
            const T s = T(1) / (T(1) + std::exp(-beta * x));
            const T pre = D * alpha * s * (T(1) - s);  // ∂L/∂(beta x)
            d_alpha += S(D) * S(s);
            d_beta += S(pre) * S(x);
            d_gamma += S(D);
            return beta * pre;
        }
        default:
            return D;
    }
}

template <typename S, typename T>
struct ChunkGradient {
    T weight;  // W_h = D·coeff[h]/r_h, for ∂b_j += W_h·(b_j^h − a_i^h), ∂a_i^h −= W_h·(…)
    S coeff;   // D·r_h, the share of ∂coeff[h]
};

// The gradient of P's term coeff[h]·r_h at an entry with D = ∂L/∂P (products in S as
// for `backward`).
template <typename S, typename T>
TP_INLINE ChunkGradient<S, T> piecewise_backward(T D, T coeff, T root) {
    return {D * coeff / root, S(D) * S(root)};
}

// Mixture K = P + alpha·S + beta with S = softmax_j(P/gamma), entry by entry from the
// column statistics max_j P and Σ_j E. E = exp(softmax_exponent(...)) = exp((P − max_j P)/gamma):
// the difference is taken before the division, so a small gamma does not magnify the
// rounding of P/gamma (at the maximum the exponent is exactly 0). Each backend applies its
// exp and sums E its own way; S = E/Σ_j E.
template <typename T>
TP_INLINE T softmax_exponent(T piecewise, T column_max, T gamma) {
    return (piecewise - column_max) / gamma;
}

// The entry's value from P and S: P + (alpha·S + beta), the softmax term formed first.
template <typename T>
TP_INLINE T mixture_value(T piecewise, T soft, T alpha, T beta) {
    return piecewise + (alpha * soft + beta);
}

template <typename S, typename T>
struct MixtureGradient {
    T piecewise;  // ∂L/∂P
    S gamma;      // the entry's share of ∂L/∂gamma
};

// Mixture at an entry with D = ∂L/∂K, softmax value `soft` and c = Σ_j D·S of its column:
// ∂L/∂P = D + alpha·soft·(D − c)/gamma, and −alpha·soft·(D − c)·z/gamma² towards ∂gamma
// with z = P − max_j P (any constant of the column gives the same sum; the max keeps a
// large P from cancelling).
template <typename S, typename T>
TP_INLINE MixtureGradient<S, T> mixture_backward(T D, T soft, T column_dot, T alpha, T gamma, T piecewise,
                                                 T column_max) {
    const T d_logit = alpha * soft * (D - column_dot);
    const T z = piecewise - column_max;
    return {D + d_logit / gamma, -(S(d_logit) * S(z) / (S(gamma) * S(gamma)))};
}

// The sparsification is out = x·factor with factor = |x| (hard) or |x| − τ⁺ (soft) where
// |x| > τ, else 0. backward: ∂out/∂x with τ and, hard, |x| held constant: |x| (hard) or
// 2|x| − τ⁺ (soft) where |x| > τ. A dropped entry's factor is the formula's value times 0,
// as in the reference's formula·mask: NaN where |x| or τ is NaN or infinite, so that a
// non-finite input is never turned into a zero gradient. τ⁺ = max(τ, 0) keeps a NaN τ.
template <typename T>
TP_INLINE T mask_factor(T x, T tau, int mode, bool backward) {
    const T magnitude = x < T(0) ? -x : x;
    const T tau_plus = tau < T(0) ? T(0) : tau;
    const T factor = mode == kHard ? magnitude : (backward ? T(2) * magnitude - tau_plus : magnitude - tau_plus);
    return magnitude > tau ? factor : factor * T(0);
}

}  // namespace tensor_peft::kernelized
