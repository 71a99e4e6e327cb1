#include "expm.h"
#include "launch.h"
#include "tensor_peft/expm.h"

namespace tensor_peft::cuda {
namespace {

// The n×n matrices a team keeps past expm's workspace: X (forward); X, E and exp(X).
constexpr int kForwardCopies = 1, kBackwardCopies = 3;

// n ≤ kLargestWarpMatrix: a team of lanes of one warp per matrix, kSmallBlock threads per
// block; larger n: a block of kLargeBlock threads per matrix.
constexpr int kLargestWarpMatrix = 16;
constexpr int kSmallBlock = 128, kLargeBlock = 256;

TP_INLINE int64_t matrix_values(int64_t n, bool backward) {
    return expm::workspace_size(n) + (backward ? kBackwardCopies : kForwardCopies) * n * n;
}

// The threads that run one matrix (the team of tensor_peft/expm.h): `size_` lanes of a
// warp that synchronize by __syncwarp on `mask`, or the whole block (mask 0). A team of
// one thread needs no synchronization.
struct Team {
    static constexpr bool serial = false;
    int rank_, size_;
    unsigned mask;
    __device__ int rank() const { return rank_; }
    __device__ int size() const { return size_; }
    __device__ void sync() const {
        if (size_ == 1) return;
        if (mask) __syncwarp(mask);
        else __syncthreads();
    }
};

// How a launch splits the batch: `team` threads per matrix, `teams` matrices per block,
// and where their workspace lies: in `shared` bytes of dynamic shared memory per block
// (the matrices' values, then their pivots), or, when `on_chip` is false (shared memory
// cannot hold one matrix's), in the caller's global workspace with only the pivots shared.
struct Plan {
    int team, teams;
    bool on_chip;
    int64_t shared;
};

// The dynamic shared memory a kernel may have on this device (with cudaFuncSetAttribute).
size_t shared_memory_limit() {
    int device = 0, limit = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    return static_cast<size_t>(limit);
}

// Small n: a team of the smallest power of two of lanes ≥ n², at most a warp, and as many
// teams per block as fill kSmallBlock threads within the default 48 KiB (one matrix of
// n ≤ 16 always fits: 42 KiB in the float64 backward). Large n: a block per matrix, its
// workspace in shared memory when the device's limit holds it.
template <typename T>
Plan plan(int n, bool backward) {
    const int64_t matrix_bytes = matrix_values(n, backward) * static_cast<int64_t>(sizeof(T));
    const int64_t pivot_bytes = n * static_cast<int64_t>(sizeof(int));
    if (n <= kLargestWarpMatrix) {
        int team = 1;
        while (team < n * n && team < 32) team *= 2;
        int teams = kSmallBlock / team;
        while (teams > 1 && teams * (matrix_bytes + pivot_bytes) > static_cast<int64_t>(kDefaultSharedLimit))
            teams /= 2;
        return {team, teams, true, teams * (matrix_bytes + pivot_bytes)};
    }
    const bool on_chip = matrix_bytes + pivot_bytes <= static_cast<int64_t>(shared_memory_limit());
    return {kLargeBlock, 1, on_chip, on_chip ? matrix_bytes + pivot_bytes : pivot_bytes};
}

// A thread's part in a launch: its team, the matrix b the team runs, the team's workspace
// of matrix_values(n, backward) values and its n pivots.
template <typename T>
struct Share {
    Team team;
    int64_t b;
    T* work;
    int* pivots;
};

template <typename T>
__device__ Share<T> share(const Plan& plan, int n, int64_t values, T* global_work) {
    TP_DYNAMIC_SHARED(T, shared);
    const int slot = static_cast<int>(threadIdx.x) / plan.team;
    const int rank = static_cast<int>(threadIdx.x) % plan.team;
    unsigned mask = 0;
    if (plan.team <= 32) {
        const int first_lane = static_cast<int>(threadIdx.x) % 32 - rank;
        mask = (plan.team == 32 ? ~0u : (1u << plan.team) - 1u) << first_lane;
    }
    const int64_t b = blockIdx.x * static_cast<int64_t>(plan.teams) + slot;
    T* work = plan.on_chip ? shared + slot * values : global_work + b * values;
    int* pivots = reinterpret_cast<int*>(plan.on_chip ? shared + plan.teams * values : shared) + slot * n;
    return {Team{rank, plan.team, mask}, b, work, pivots};
}

template <typename T, int N>
__global__ void forward_kernel(const T* A, T* out, int64_t batch, int n, Plan plan, T* global_work) {
    const Share<T> my = share(plan, n, matrix_values(n, false), global_work);
    if (my.b >= batch) return;  // the whole team: the batch's tail in the last block
    const Team& team = my.team;
    const int nn = n * n;
    T* X = my.work + expm::workspace_size(n);  // A, scaled in place
    for (int e = team.rank(); e < nn; e += team.size()) X[e] = A[my.b * nn + e];
    team.sync();
    expm::exp_and_frechet<T, N>(X, nullptr, out + my.b * nn, nullptr, n, my.work, my.pivots, team);
}

template <typename T, int N>
__global__ void backward_kernel(const T* grad, const T* A, T* dA, int64_t batch, int n, Plan plan, T* global_work) {
    const Share<T> my = share(plan, n, matrix_values(n, true), global_work);
    if (my.b >= batch) return;
    const Team& team = my.team;
    const int nn = n * n;
    T* X = my.work + expm::workspace_size(n);  // Aᵀ
    T* E = X + nn;                              // c·Γ
    T* exp_X = E + nn;
    const T* g = grad + my.b * nn;
    const T* a = A + my.b * nn;
    const int shift = expm::gradient_shift(g, n);
    const T down = ldexp(T(1), -shift), up = ldexp(T(1), shift);  // powers of two: exact
    for (int e = team.rank(); e < nn; e += team.size()) {
        X[e] = a[e % n * n + e / n];
        E[e] = down * g[e];
    }
    team.sync();
    T* d = dA + my.b * nn;
    expm::exp_and_frechet<T, N>(X, E, exp_X, d, n, my.work, my.pivots, team);
    for (int e = team.rank(); e < nn; e += team.size()) d[e] *= up;
}

// Above 48 KiB a kernel's dynamic shared memory must be allowed explicitly.
template <typename... Params>
void allow_shared_memory(const char* name, void (*kernel)(Params...), int64_t bytes) {
    if (bytes <= static_cast<int64_t>(kDefaultSharedLimit)) return;
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (status != cudaSuccess) throw std::runtime_error(std::string(name) + ": " + cudaGetErrorString(status));
}

// kernel(args...) over the batch as `plan` splits it.
template <typename... Params, typename... Args>
void launch_plan(const char* name, void (*kernel)(Params...), const Plan& plan, int64_t batch, cudaStream_t stream,
                 Args... args) {
    allow_shared_memory(name, kernel, plan.shared);
    const auto blocks = static_cast<unsigned>((batch + plan.teams - 1) / plan.teams);
    launch(name, kernel, blocks, static_cast<unsigned>(plan.team * plan.teams), static_cast<size_t>(plan.shared),
           stream, args...);
}

template <int N>
struct Forward {
    template <typename T>
    static void run(const T* A, T* out, int64_t batch, int n, T* work, cudaStream_t stream) {
        const Plan p = plan<T>(n, false);
        launch_plan("matrix_exp_forward", forward_kernel<T, N>, p, batch, stream, A, out, batch, n, p, work);
    }
};

template <int N>
struct Backward {
    template <typename T>
    static void run(const T* grad, const T* A, T* dA, int64_t batch, int n, T* work, cudaStream_t stream) {
        const Plan p = plan<T>(n, true);
        launch_plan("matrix_exp_backward", backward_kernel<T, N>, p, batch, stream, grad, A, dA, batch, n, p, work);
    }
};

}  // namespace

template <typename T>
int64_t matrix_exp_workspace(int64_t n, bool backward) {
    return plan<T>(static_cast<int>(n), backward).on_chip ? 0 : matrix_values(n, backward);
}

template <typename T>
void matrix_exp_forward(const T* A, T* out, int64_t batch, int n, T* work, std::uintptr_t stream) {
    if (batch == 0) return;
    expm::with_size<Forward>(n, A, out, batch, n, work, reinterpret_cast<cudaStream_t>(stream));
}

template <typename T>
void matrix_exp_backward(const T* grad, const T* A, T* dA, int64_t batch, int n, T* work, std::uintptr_t stream) {
    if (batch == 0) return;
    expm::with_size<Backward>(n, grad, A, dA, batch, n, work, reinterpret_cast<cudaStream_t>(stream));
}

template int64_t matrix_exp_workspace<float>(int64_t, bool);
template int64_t matrix_exp_workspace<double>(int64_t, bool);
template void matrix_exp_forward<float>(const float*, float*, int64_t, int, float*, std::uintptr_t);
template void matrix_exp_forward<double>(const double*, double*, int64_t, int, double*, std::uintptr_t);
template void matrix_exp_backward<float>(const float*, const float*, float*, int64_t, int, float*, std::uintptr_t);
template void matrix_exp_backward<double>(const double*, const double*, double*, int64_t, int, double*,
                                          std::uintptr_t);

}  // namespace tensor_peft::cuda
