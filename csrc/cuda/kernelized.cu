// SNELL on CUDA: the kernelized update, its competition sparsification and the backward
// of both (see kernelized.h), each entry's κ and gradient those of tensor_peft/kernelized.h.
//
// Tiles are blocks of 32 columns × kWarps rows: a warp is one row j over 32 columns i, so
// its reads of In (transposed) are coalesced and row sums are warp shuffles. Mixture's
// column statistics take a block per 32 columns, its warps over strips of rows. The radix
// select takes 8-bit digits: each pass a 256-bin shared-memory histogram per block,
// added into int64 global counts, then one thread picks the bin on the device.
#include <algorithm>
#include <limits>

#include "half.h"
#include "kernelized.h"
#include "launch.h"
#include "tensor_peft/kernelized.h"
#include "tensor_peft/radix_select.h"

namespace tensor_peft::cuda {
namespace {

using namespace tensor_peft::kernelized;  // ids, κ and its gradient per entry, mask_factor

constexpr int kDigit = 8;
constexpr int kBins = 1 << kDigit;
constexpr int kWarps = 8;           // rows of a tile
constexpr int kColumnWarps = 16;    // strips of rows in mixture's column pass
constexpr int kThreads = 256;       // elementwise kernels
constexpr int64_t kBackwardRowBlocks = 64;  // blocks down the rows in backward: fewer parameter atomics
constexpr int64_t kMaxCountBlocks = 4096;

template <typename T>
constexpr int passes() {
    return (radix::Key<T>::kBits + kDigit - 1) / kDigit;
}

// Σ over chunks first ≤ h < last of ‖b_j^h − a_i^h‖² (direct differences) or of b_j^h·a_i^h.
template <typename T>
__device__ T chunk_sum(const Kernelized<T>& P, int64_t j, int64_t i, int64_t first, int64_t last, bool dot) {
    T acc = 0;
    for (int64_t h = first; h < last; ++h) {
        const T* b = P.out_emb + (h * P.m + j) * P.width;
        const T* a = P.in_t + h * P.width * P.n + i;
        for (int64_t d = 0; d < P.width; ++d) {
            const T bd = b[d], ad = a[d * P.n];
            acc += dot ? bd * ad : (bd - ad) * (bd - ad);
        }
    }
    return acc;
}

// x of the kernels not built on P: b_j·a_i or ‖b_j − a_i‖² (each loop compiled for its own).
template <typename T>
__device__ T reduction(const Kernelized<T>& P, int64_t j, int64_t i) {
    return is_dot_product(P.kernel) ? chunk_sum(P, j, i, 0, P.chunks, true) : chunk_sum(P, j, i, 0, P.chunks, false);
}

// P = Σ_h coeff[h]·sqrt(‖b_j^h − a_i^h‖² + eps).
template <typename T>
__device__ T piecewise_value(const Kernelized<T>& P, int64_t j, int64_t i) {
    T acc = 0;
    for (int64_t h = 0; h < P.chunks; ++h)
        acc += P.coeff[h] * piecewise_root(chunk_sum(P, j, i, h, h + 1, false), P.eps);
    return acc;
}

// Mixture's S_ji = softmax_j(P/gamma) from the column statistics in P.columns.
template <typename T>
__device__ T softmax(const Kernelized<T>& P, T piecewise, int64_t i) {
    return exp(softmax_exponent(piecewise, P.columns[i], P.params[2])) / P.columns[P.n + i];
}

// κ(b_j, a_i); for mixture also its piecewise part P (the other kernels leave it alone).
template <typename T>
__device__ T kernel_value(const Kernelized<T>& P, int64_t j, int64_t i, T& piecewise) {
    const T alpha = P.params[0], beta = P.params[1], gamma = P.params[2];
    if (!is_piecewise(P.kernel))
        return value(P.kernel, reduction(P, j, i), alpha, beta, gamma);
    piecewise = piecewise_value(P, j, i);
    if (P.kernel == kPiecewise) return piecewise;
    return mixture_value(piecewise, softmax(P, piecewise, i), alpha, beta);
}

// The larger of a and b, a when b is NaN: the CPU's std::max(a, b), so that both leave a NaN P
// out of the column's max.
template <typename T>
__device__ T larger(T a, T b) {
    return a < b ? b : a;
}

template <typename T>
__device__ T warp_sum(T value) {
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

// κ in T, each entry rounded once into out's storage type Stored.
template <typename Stored, typename T>
__global__ void delta_kernel(Kernelized<T> P, Stored* out) {
    const int64_t i = blockIdx.x * int64_t(32) + threadIdx.x;
    if (i >= P.n) return;
    for (int64_t j = blockIdx.y * int64_t(kWarps) + threadIdx.y; j < P.m; j += int64_t(gridDim.y) * kWarps) {
        T piecewise;
        out[j * P.n + i] = narrow<Stored>(kernel_value(P, j, i, piecewise));
    }
}

// Mixture's column statistics, a block per tile of 32 columns, its kColumnWarps warps over
// strips of rows (warp w takes rows w, w + kColumnWarps, …): max_j P into columns[0, n)
// and Σ_j exp((P − max_j P)/gamma) (summed in double) into [n, 2n); or (dot) c_i = Σ_j
// D_ji S_ji into [2n, 3n), D = Γ after the mask's derivative. Each warp's partials are
// combined in warp order by the first warp: the same bits at any schedule. Γ is of type Stored.
template <typename Stored, typename T>
__global__ void columns_kernel(Kernelized<T> P, const Stored* grad, const T* tau, int mode, bool dot) {
    __shared__ T maxima[kColumnWarps][32];
    __shared__ double sums[kColumnWarps][32];
    const int64_t i_raw = blockIdx.x * int64_t(32) + threadIdx.x;
    const bool col_in = i_raw < P.n;
    const int64_t i = col_in ? i_raw : P.n - 1;  // reads stay in bounds; nothing is written outside
    const T gamma = P.params[2];
    double acc = 0;
    if (!dot) {
        T top = -std::numeric_limits<T>::infinity();
        for (int64_t j = threadIdx.y; j < P.m; j += kColumnWarps) top = larger(top, piecewise_value(P, j, i));
        maxima[threadIdx.y][threadIdx.x] = top;
        __syncthreads();
        top = maxima[0][threadIdx.x];
        for (int w = 1; w < kColumnWarps; ++w) top = larger(top, maxima[w][threadIdx.x]);
        for (int64_t j = threadIdx.y; j < P.m; j += kColumnWarps)
            acc += exp(softmax_exponent(piecewise_value(P, j, i), top, gamma));
        if (threadIdx.y == 0 && col_in) P.columns[i] = top;
    } else {
        const T t = mode != kNone ? *tau : T(0);
        for (int64_t j = threadIdx.y; j < P.m; j += kColumnWarps) {
            T piecewise;
            const T value = kernel_value(P, j, i, piecewise);
            T D = T(widen(grad[j * P.n + i]));
            if (mode != kNone) D *= mask_factor(value, t, mode, true);
            acc += double(D) * double(softmax(P, piecewise, i));
        }
    }
    sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y != 0 || !col_in) return;
    double total = 0;
    for (int w = 0; w < kColumnWarps; ++w) total += sums[w][threadIdx.x];
    P.columns[(dot ? 2 : 1) * P.n + i] = static_cast<T>(total);
}

// Row j's and column i's share of chunk h's embedding gradients from the weight W of
// entry (j, i): distance kernels ∂b_j += W (b_j − a_i), ∂a_i −= W (b_j − a_i); dot-product
// kernels ∂b_j += W a_i, ∂a_i += W b_j. Row sums by shuffles, column sums through shared
// memory; every thread of the block calls it (it synchronizes).
template <typename T>
__device__ void embedding_gradients(const Kernelized<T>& P, int64_t h, int64_t j, int64_t i, bool row_in, bool col_in,
                                    T W, bool distance, T* d_out_emb, T* d_in_t, T (*column_part)[32]) {
    const T* b = P.out_emb + (h * P.m + j) * P.width;
    const T* a = P.in_t + h * P.width * P.n + i;
    for (int64_t d = 0; d < P.width; ++d) {
        const T bd = b[d], ad = a[d * P.n];
        const T row = warp_sum(distance ? W * (bd - ad) : W * ad);
        if (threadIdx.x == 0 && row_in) atomicAdd(&d_out_emb[(h * P.m + j) * P.width + d], row);
        column_part[threadIdx.y][threadIdx.x] = distance ? W * (ad - bd) : W * bd;
        __syncthreads();
        if (threadIdx.y == 0 && col_in) {
            T column = 0;
            for (int w = 0; w < kWarps; ++w) column += column_part[w][threadIdx.x];
            atomicAdd(&d_in_t[(h * P.width + d) * P.n + i], column);
        }
        __syncthreads();
    }
}

// Block sums in shared memory, then into the float64 parameter gradients: coeff[h] in
// block_sums[0, H), (alpha, beta, gamma) in [H, H + 3). Γ is of type Stored.
template <typename Stored, typename T>
__global__ void backward_kernel(Kernelized<T> P, const Stored* grad, const T* tau_ptr, int mode, T* d_out_emb,
                                T* d_in_t, double* d_coeff, double* d_params) {
    TP_DYNAMIC_SHARED(double, block_sums);
    __shared__ T column_part[kWarps][32];
    const int thread = threadIdx.y * 32 + threadIdx.x;
    for (int64_t s = thread; s < P.chunks + 3; s += 32 * kWarps) block_sums[s] = 0;
    __syncthreads();
    const int64_t i_raw = blockIdx.x * int64_t(32) + threadIdx.x;
    const bool col_in = i_raw < P.n;
    const int64_t i = col_in ? i_raw : P.n - 1;  // reads stay in bounds; W is 0 outside
    const T alpha = P.params[0], beta = P.params[1], gamma = P.params[2];
    const T tau = mode != kNone ? *tau_ptr : T(0);
    const bool piecewise_kernel = is_piecewise(P.kernel);
    double sums[3] = {0, 0, 0};  // this thread's shares of ∂alpha, ∂beta, ∂gamma
    for (int64_t j0 = blockIdx.y * int64_t(kWarps); j0 < P.m; j0 += int64_t(gridDim.y) * kWarps) {
        const bool row_in = j0 + threadIdx.y < P.m;
        const int64_t j = row_in ? j0 + threadIdx.y : P.m - 1;
        const bool in = row_in && col_in;
        T D = in ? T(widen(grad[j * P.n + i])) : T(0);  // ∂L/∂κ, then ∂L/∂P for mixture
        if (in && (P.kernel == kMixture || mode != kNone)) {
            T piecewise;
            const T value = kernel_value(P, j, i, piecewise);
            if (mode != kNone) D *= mask_factor(value, tau, mode, true);
            if (P.kernel == kMixture) {
                const T soft = softmax(P, piecewise, i);
                const MixtureGradient<double, T> g =
                    mixture_backward<double>(D, soft, P.columns[2 * P.n + i], alpha, gamma, piecewise, P.columns[i]);
                sums[0] += double(D) * double(soft);
                sums[1] += double(D);
                sums[2] += g.gamma;
                D = g.piecewise;
            }
        }
        if (piecewise_kernel) {
            for (int64_t h = 0; h < P.chunks; ++h) {
                const T r = piecewise_root(chunk_sum(P, j, i, h, h + 1, false), P.eps);
                const ChunkGradient<double, T> g = piecewise_backward<double>(D, P.coeff[h], r);
                const double share = warp_sum(in ? g.coeff : 0.0);
                if (threadIdx.x == 0) atomicAdd(&block_sums[h], share);
                embedding_gradients(P, h, j, i, row_in, col_in, in ? g.weight : T(0), true, d_out_emb, d_in_t,
                                    column_part);
            }
            continue;
        }
        const T x = backward_reads_x(P.kernel) ? reduction(P, j, i) : T(0);
        const T W = backward<double>(P.kernel, D, x, alpha, beta, sums[0], sums[1], sums[2]);
        for (int64_t h = 0; h < P.chunks; ++h)
            embedding_gradients(P, h, j, i, row_in, col_in, in ? W : T(0), !is_dot_product(P.kernel), d_out_emb,
                                d_in_t, column_part);
    }
    for (int p = 0; p < 3; ++p) {
        const double share = warp_sum(sums[p]);
        if (threadIdx.x == 0) atomicAdd(&block_sums[P.chunks + p], share);
    }
    __syncthreads();
    for (int64_t s = thread; s < P.chunks + 3; s += 32 * kWarps) {
        if (s < P.chunks) atomicAdd(&d_coeff[s], block_sums[s]);
        else atomicAdd(&d_params[s - P.chunks], block_sums[s]);
    }
}

// One pass of the radix select: counts[digit] += the keys whose found digits match
// state = (prefix, prefix_mask). The keys are those of x's values in T (exact for 16-bit x).
template <typename X, typename T>
__global__ void count_kernel(const X* x, int64_t count, unsigned long long* counts, const uint64_t* state, int shift) {
    using Bits = typename radix::Key<T>::type;
    __shared__ unsigned int histogram[kBins];
    for (int b = threadIdx.x; b < kBins; b += blockDim.x) histogram[b] = 0;
    __syncthreads();
    const Bits prefix = static_cast<Bits>(state[0]), prefix_mask = static_cast<Bits>(state[1]);
    for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
        const Bits key = radix::abs_key(T(widen(x[e])));
        if ((key & prefix_mask) == prefix) atomicAdd(&histogram[(key >> shift) & (kBins - 1)], 1u);
    }
    __syncthreads();
    for (int b = threadIdx.x; b < kBins; b += blockDim.x)
        if (histogram[b]) atomicAdd(&counts[b], static_cast<unsigned long long>(histogram[b]));
}

// One thread: the bin holding the rank-th key joins the prefix (rank = k on the first
// pass, k ≥ 1), and τ = the value of the prefix so far (the answer after the last pass).
template <typename T>
__global__ void search_kernel(const unsigned long long* counts, uint64_t* state, int shift, int64_t first_rank, T* tau) {
    int64_t rank = first_rank > 0 ? first_rank : static_cast<int64_t>(state[2]);
    const int64_t bin = radix::pick_bin(reinterpret_cast<const int64_t*>(counts), kBins, rank);
    state[0] |= static_cast<uint64_t>(bin) << shift;
    state[1] |= static_cast<uint64_t>(kBins - 1) << shift;
    state[2] = static_cast<uint64_t>(rank);
    *tau = radix::from_key<T>(static_cast<typename radix::Key<T>::type>(state[0]));
}

// out = x·factor, or (backward) grad·∂(x·factor)/∂x, computed in T and rounded once into
// out's Stored; out may be x.
template <typename X, typename Stored, typename T>
__global__ void mask_kernel(const X* x, const Stored* grad, Stored* out, int64_t count, const T* tau, int mode,
                            bool backward) {
    const T t = *tau;
    for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
        const T value = T(widen(x[e]));
        const T factor = mask_factor(value, t, mode, backward);
        out[e] = narrow<Stored>((backward ? T(widen(grad[e])) : value) * factor);
    }
}

unsigned elementwise_blocks(int64_t count) {
    return static_cast<unsigned>(std::max<int64_t>(1, std::min((count + kThreads - 1) / kThreads, kMaxCountBlocks)));
}

dim3 tile_grid(int64_t m, int64_t n, int64_t max_row_blocks) {
    return dim3(static_cast<unsigned>((n + 31) / 32),
                static_cast<unsigned>(std::min((m + kWarps - 1) / kWarps, max_row_blocks)));
}

// τ = the k-th smallest |x| (k ≥ 1) as a T, written to device memory.
template <typename X, typename T>
void select_threshold(const X* x, int64_t count, int64_t k, T* tau, int64_t* work, cudaStream_t stream) {
    auto* counts = reinterpret_cast<unsigned long long*>(work);
    auto* state = reinterpret_cast<uint64_t*>(work + passes<T>() * kBins);
    cudaMemsetAsync(work, 0, sizeof(int64_t) * (passes<T>() * kBins + 3), stream);
    for (int pass = 0; pass < passes<T>(); ++pass) {
        const int shift = std::max(radix::Key<T>::kBits - kDigit * (pass + 1), 0);
        launch("radix select count_kernel", count_kernel<X, T>, elementwise_blocks(count), kThreads, 0, stream, x,
               count, counts + pass * kBins, state, shift);
        launch("radix select search_kernel", search_kernel<T>, 1, 1, 0, stream, counts + pass * kBins, state, shift,
               pass == 0 ? k : 0, tau);
    }
}

// Mixture's column pass: the softmax statistics, or (dot) Σ_j D·S.
template <typename Stored, typename T>
void column_pass(const Kernelized<T>& P, const Stored* grad, const T* tau, int mode, bool dot, cudaStream_t stream) {
    const unsigned blocks = static_cast<unsigned>((P.n + 31) / 32);
    launch("kernelized columns_kernel", columns_kernel<Stored, T>, blocks, dim3(32, kColumnWarps), 0, stream, P, grad,
           tau, mode, dot);
}

}  // namespace

int64_t select_workspace(bool is_double) {
    return int64_t(is_double ? passes<double>() : passes<float>()) * kBins + 3;
}

int64_t columns_workspace(int64_t n, int kernel) { return kernel == kMixture ? 3 * n : 0; }

template <typename S, typename T>
void kernelized_forward(const Kernelized<T>& P, S* out_storage, T* raw, int64_t k, int mode, T* tau,
                        int64_t* select_work, std::uintptr_t stream_handle) {
    if (P.m * P.n == 0) return;
    using Stored = device_t<S>;
    Stored* out = device_ptr(out_storage);
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    if (P.kernel == kMixture) column_pass<T, T>(P, nullptr, nullptr, kNone, false, stream);
    const dim3 grid = tile_grid(P.m, P.n, kMaxGridY);
    if (mode == kNone) {
        launch("kernelized delta_kernel", delta_kernel<Stored, T>, grid, dim3(32, kWarps), 0, stream, P, out);
        return;
    }
    launch("kernelized delta_kernel", delta_kernel<T, T>, grid, dim3(32, kWarps), 0, stream, P, raw);
    if (k > 0) select_threshold<T, T>(raw, P.m * P.n, k, tau, select_work, stream);
    launch("kernelized mask_kernel", mask_kernel<T, Stored, T>, elementwise_blocks(P.m * P.n), kThreads, 0, stream,
           raw, nullptr, out, P.m * P.n, tau, mode, false);
}

template <typename S, typename T>
void kernelized_backward(const Kernelized<T>& P, const S* grad_storage, const T* tau, int mode, T* d_out_emb,
                         T* d_in_t, double* d_coeff, double* d_params, std::uintptr_t stream_handle) {
    if (P.m * P.n == 0) return;
    using Stored = device_t<S>;
    const Stored* grad = device_ptr(grad_storage);
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    if (P.kernel == kMixture) {
        column_pass<T, T>(P, nullptr, nullptr, kNone, false, stream);
        column_pass<Stored, T>(P, grad, tau, mode, true, stream);
    }
    const size_t shared = sizeof(double) * static_cast<size_t>(P.chunks + 3);
    launch("kernelized backward_kernel", backward_kernel<Stored, T>, tile_grid(P.m, P.n, kBackwardRowBlocks),
           dim3(32, kWarps), shared, stream, P, grad, tau, mode, d_out_emb, d_in_t, d_coeff, d_params);
}

template <typename S, typename T>
void sparsify(const S* x_storage, S* out_storage, int64_t count, int64_t k, int mode, T* tau, int64_t* select_work,
              std::uintptr_t stream_handle) {
    if (count == 0) return;
    using Stored = device_t<S>;
    const Stored* x = device_ptr(x_storage);
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    if (k > 0) select_threshold<Stored, T>(x, count, k, tau, select_work, stream);
    launch("sparsify mask_kernel", mask_kernel<Stored, Stored, T>, elementwise_blocks(count), kThreads, 0, stream, x,
           nullptr, device_ptr(out_storage), count, tau, mode, false);
}

template <typename S, typename T>
void sparsify_backward(const S* grad, const S* x, S* d_x, int64_t count, const T* tau, int mode,
                       std::uintptr_t stream_handle) {
    if (count == 0) return;
    using Stored = device_t<S>;
    const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
    launch("sparsify_backward mask_kernel", mask_kernel<Stored, Stored, T>, elementwise_blocks(count), kThreads, 0,
           stream, device_ptr(x), device_ptr(grad), device_ptr(d_x), count, tau, mode, true);
}

#define TP_INSTANTIATE(S, T)                                                                                      \
    template void kernelized_forward<S, T>(const Kernelized<T>&, S*, T*, int64_t, int, T*, int64_t*,              \
                                           std::uintptr_t);                                                       \
    template void kernelized_backward<S, T>(const Kernelized<T>&, const S*, const T*, int, T*, T*, double*,       \
                                            double*, std::uintptr_t);                                             \
    template void sparsify<S, T>(const S*, S*, int64_t, int64_t, int, T*, int64_t*, std::uintptr_t);              \
    template void sparsify_backward<S, T>(const S*, const S*, S*, int64_t, const T*, int, std::uintptr_t);
TP_FOR_EACH_STORAGE(TP_INSTANTIATE)
#undef TP_INSTANTIATE

}  // namespace tensor_peft::cuda
