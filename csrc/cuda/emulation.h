// CUDA's execution model on the host, for the g++ build of csrc/cuda (TP_CUDA_EMULATION):
// the .cu files compile unchanged and their kernels run on CPU memory.
//
// A launch runs the grid's blocks one after another on the calling OS thread. Each CUDA
// thread of a block is a fiber with its own stack; a fiber runs until it reaches a barrier
// (__syncthreads, or a warp rendezvous: __shfl_*_sync, __syncwarp) or returns. A block
// barrier opens when every live thread of the block waits at the same __syncthreads; a
// warp rendezvous completes when every lane of its mask has arrived. What a GPU leaves
// undefined raises tensor_peft::emu::Error naming the kernel: a barrier some live threads
// never reach, a shuffle whose mask names a lane that has exited or does not exist.
// Static __shared__ variables are per OS thread (so per block, blocks being sequential),
// dynamic shared memory is a per-launch buffer filled with 0xff bytes (NaN) for each block.
// The schedule (forward, reverse, or shuffled with a seed) is the order blocks run in and
// the priority of a block's threads: the first ready thread in it always runs next.
// Results that differ between schedules are races. Atomics are plain read-modify-writes:
// no two fibers run at once.
#pragma once

#include <math.h>  // exp, ldexp, … with their float overloads in the global namespace
#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local
#define __syncthreads() ::tensor_peft::emu::sync_threads(__FILE__, __LINE__)
#define threadIdx (::tensor_peft::emu::current_block->current->index)
#define blockIdx (::tensor_peft::emu::current_block->index)
#define blockDim (::tensor_peft::emu::current_block->dim)
#define gridDim (::tensor_peft::emu::current_block->grid)
#define TP_EMU_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::tensor_peft::emu::current_block->shared)

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlock = 8, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaStream_t = struct tp_emulated_stream*;  // any value: work runs at once, in order

namespace tensor_peft::emu {

// What a GPU leaves undefined (a barrier or warp operation some threads never reach).
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

enum class Schedule { forward, reverse, shuffle };

// The emulated device: sm_90 by default (80 and 90 differ in the opt-in shared memory).
struct Settings {
    Schedule schedule = Schedule::forward;
    uint64_t seed = 0;
    int compute_capability = 90;
    std::function<void(const std::string&)> report;  // told what a GPU of the other kind refuses
};
inline Settings settings;

constexpr size_t kDefaultSharedLimit = 48 * 1024;
constexpr size_t kSm80SharedOptin = 163 * 1024, kSm90SharedOptin = 227 * 1024;
inline size_t shared_optin_limit() { return settings.compute_capability >= 90 ? kSm90SharedOptin : kSm80SharedOptin; }

// Dynamic shared memory each kernel was allowed with cudaFuncSetAttribute.
inline std::map<const void*, size_t> shared_opt_ins;

// ---- Contexts: a fiber's saved registers and the switch between fibers.
#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack and its pointer in *save, then
// restores those of the stack `next` and returns into it.
asm(R"(
    .pushsection .text.tp_emu_switch,"axG",@progbits,tp_emu_switch,comdat
    .globl tp_emu_switch
    .hidden tp_emu_switch
    .type tp_emu_switch, @function
tp_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size tp_emu_switch, .-tp_emu_switch
    .popsection
)");
extern "C" void tp_emu_switch(void** save, void* next);

struct Context {
    void* sp = nullptr;
};
inline void swap(Context& from, Context& to) { tp_emu_switch(&from.sp, to.sp); }
// `context` starts `entry` on the stack [base, base + size) when first switched to.
inline void start(Context& context, char* base, size_t size, void (*entry)()) {
    auto** sp = reinterpret_cast<void**>(base + size);  // 16-byte aligned
    *--sp = nullptr;                                    // entry's return address: none
    *--sp = reinterpret_cast<void*>(entry);             // tp_emu_switch returns into entry
    for (int r = 0; r < 6; ++r) *--sp = nullptr;        // rbp, rbx, r12–r15
    context.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
inline void swap(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void start(Context& context, char* base, size_t size, void (*entry)()) {
    getcontext(&context.uc);
    context.uc.uc_stack.ss_sp = base;
    context.uc.uc_stack.ss_size = size;
    context.uc.uc_link = nullptr;
    makecontext(&context.uc, entry, 0);
}
#endif

// ---- Threads, warps and blocks.
enum class State { ready, at_barrier, at_warp, done };

struct Thread {
    Context context;
    State state;
    dim3 index;
    int lane, warp;
    const char* file;  // the __syncthreads it waits at
    int line;
};

// Lanes of disjoint masks (tiles of a warp, e.g. __syncwarp on each half) may have
// rendezvous pending at once; lanes whose masks overlap must meet at the same one.
struct Warp {
    unsigned size;                 // lanes (the block's last warp may have fewer than 32)
    unsigned arrived;              // lanes waiting at a pending rendezvous
    unsigned mask[32];             // the mask each waiting lane named
    const char* op[32];            // and its operation
    int source[32];                // lane each lane reads
    uint64_t value[32], result[32];
};

struct Block {
    const char* kernel;
    dim3 index, dim, grid;
    unsigned char* shared;
    std::function<void()> body;
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    std::vector<size_t> order, rank;  // the schedule: threads by priority, and each thread's place in it
    size_t first_ready;               // no thread before this place of `order` is ready
    Thread* current;
    Context scheduler;
    std::string error;  // what stopped a fiber
};
inline thread_local Block* current_block = nullptr;

inline void make_ready(Block& block, Thread& thread) {
    thread.state = State::ready;
    block.first_ready = std::min(block.first_ready, block.rank[static_cast<size_t>(&thread - block.threads.data())]);
}

[[noreturn]] inline void fail(const std::string& what) { throw Error(what); }

// Stacks of the fibers of this OS thread, each above a guard page; kept between launches.
class Stacks {
public:
    static constexpr size_t kSize = 256 * 1024, kGuard = 4096;
    char* get(size_t count) {
        if (count > count_) {
            release();
            void* memory = mmap(nullptr, count * (kSize + kGuard), PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (memory == MAP_FAILED) fail("no memory for " + std::to_string(count) + " thread stacks");
            base_ = static_cast<char*>(memory);
            count_ = count;
            for (size_t t = 0; t < count; ++t) mprotect(base_ + t * (kSize + kGuard), kGuard, PROT_NONE);
        }
        return base_;
    }
    ~Stacks() { release(); }

private:
    void release() {
        if (base_) munmap(base_, count_ * (kSize + kGuard));
        base_ = nullptr;
        count_ = 0;
    }
    char* base_ = nullptr;
    size_t count_ = 0;
};
inline thread_local Stacks stacks;

// Back to the scheduler until this thread is released.
inline void wait(Thread& thread) { swap(thread.context, current_block->scheduler); }

inline void fiber_main() {
    Block& block = *current_block;
    try {
        block.body();
    } catch (const std::exception& error) {
        block.error = error.what();
    }
    block.current->state = State::done;
    swap(block.current->context, block.scheduler);
}

inline void sync_threads(const char* file, int line) {
    Thread& thread = *current_block->current;
    thread.state = State::at_barrier;
    thread.file = file;
    thread.line = line;
    wait(thread);
}

// A warp rendezvous: every lane of `mask` deposits `value` and reads that of lane
// `source` (its own value when source < 0: the lane shuffles nothing in).
template <typename T>
T warp_exchange(const char* op, unsigned mask, T value, int source) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "warp values are at most 8 bytes");
    Block& block = *current_block;
    Thread& thread = *block.current;
    Warp& warp = block.warps[thread.warp];
    const int lane = thread.lane;
    if (!(mask >> lane & 1u)) fail(std::string(op) + ": lane " + std::to_string(lane) + " is not in its mask");
    if (warp.size < 32 && mask >> warp.size) fail(std::string(op) + ": the mask names lanes past the block's last thread");
    for (unsigned l = 0; l < warp.size; ++l)
        if (mask >> l & 1u && block.threads[thread.warp * 32 + l].state == State::done)
            fail(std::string(op) + ": lane " + std::to_string(l) + " of the mask has exited");
    for (unsigned l = 0; l < warp.size; ++l)
        if (warp.arrived >> l & 1u && (mask >> l & 1u || warp.mask[l] >> lane & 1u) &&
            (warp.mask[l] != mask || warp.op[l] != op))
            fail(std::string(op) + ": lanes of one warp meet at different warp operations or masks");
    if (source >= 0 && !(mask >> source & 1u))
        fail(std::string(op) + ": lane " + std::to_string(lane) + " reads lane " + std::to_string(source) +
             ", not in the mask");
    std::memcpy(&warp.value[lane], &value, sizeof(T));
    warp.source[lane] = source < 0 ? lane : source;
    warp.mask[lane] = mask;
    warp.op[lane] = op;
    warp.arrived |= 1u << lane;
    if ((warp.arrived & mask) == mask) {
        for (unsigned l = 0; l < warp.size; ++l) {
            if (!(mask >> l & 1u)) continue;
            warp.result[l] = warp.value[warp.source[l]];
            make_ready(block, block.threads[thread.warp * 32 + l]);
        }
        warp.arrived &= ~mask;
    } else {
        thread.state = State::at_warp;
        wait(thread);
    }
    T out;
    std::memcpy(&out, &warp.result[lane], sizeof(T));
    return out;
}

inline int lane_of_thread() { return current_block->current->lane; }

// ---- The schedule: the order of blocks and the priority of a block's threads. The
// scheduler always resumes the first ready thread in the order, so that threads early in
// it run as far ahead of the others as barriers let them (and show what a missing
// barrier lets them overwrite).
inline void reorder(Block& block, std::mt19937_64& random) {
    std::vector<size_t>& order = block.order;
    if (order.size() != block.threads.size()) {
        order.resize(block.threads.size());
        block.rank.resize(block.threads.size());
        std::iota(order.begin(), order.end(), size_t(0));
        if (settings.schedule == Schedule::reverse) std::reverse(order.begin(), order.end());
    }
    if (settings.schedule == Schedule::shuffle) std::shuffle(order.begin(), order.end(), random);
    for (size_t p = 0; p < order.size(); ++p) block.rank[order[p]] = p;
    block.first_ready = 0;
}

inline std::string where(dim3 d) {
    return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

inline bool same_barrier(const Thread& a, const Thread& b) {
    return a.line == b.line && std::strcmp(a.file, b.file) == 0;
}

inline std::string barrier_name(const Thread& t) {
    const char* slash = std::strrchr(t.file, '/');
    return "the __syncthreads of " + std::string(slash ? slash + 1 : t.file) + ":" + std::to_string(t.line);
}

// Runs block.threads to completion, releasing barriers as they fill.
inline void run_block(Block& block, std::mt19937_64& random) {
    char* stack = stacks.get(block.threads.size());
    for (size_t t = 0; t < block.threads.size(); ++t) {
        Thread& thread = block.threads[t];
        thread.state = State::ready;
        start(thread.context, stack + t * (Stacks::kSize + Stacks::kGuard) + Stacks::kGuard, Stacks::kSize,
              fiber_main);
    }
    for (Warp& warp : block.warps) warp.arrived = 0;
    reorder(block, random);
    for (;;) {
        while (block.first_ready < block.order.size()) {
            Thread& thread = block.threads[block.order[block.first_ready]];
            if (thread.state != State::ready) {
                ++block.first_ready;
                continue;
            }
            block.current = &thread;
            swap(block.scheduler, thread.context);
            if (!block.error.empty()) fail(block.error);
        }
        const Thread* barrier = nullptr;
        const Thread* stuck = nullptr;  // a live thread the barrier cannot release
        for (const Thread& thread : block.threads) {
            if (thread.state == State::done) continue;
            if (thread.state == State::at_barrier && (!barrier || same_barrier(*barrier, thread))) barrier = &thread;
            else stuck = &thread;
        }
        if (!barrier && !stuck) return;
        if (stuck) {
            std::string what = "threads of block " + where(block.index) + " can never go on: thread " +
                               where(stuck->index) +
                               (stuck->state == State::at_warp
                                    ? std::string(" waits at ") + block.warps[stuck->warp].op[stuck->lane] +
                                          " for lanes that never arrive"
                                    : " waits at " + barrier_name(*stuck));
            if (barrier) what += ", thread " + where(barrier->index) + " at " + barrier_name(*barrier);
            fail(what + " (divergent barrier or warp operation)");
        }
        for (Thread& thread : block.threads)
            if (thread.state == State::at_barrier) thread.state = State::ready;
        reorder(block, random);
    }
}

// Runs body as the kernel of each thread of each block.
inline void run_grid(const char* kernel, dim3 grid, dim3 dim, size_t shared_bytes, std::function<void()> body) {
    Block block;
    block.kernel = kernel;
    block.grid = grid;
    block.dim = dim;
    block.body = std::move(body);
    const size_t count = size_t(dim.x) * dim.y * dim.z;
    block.threads.resize(count);
    for (size_t t = 0; t < count; ++t) {
        Thread& thread = block.threads[t];
        thread.index = dim3(t % dim.x, t / dim.x % dim.y, t / (size_t(dim.x) * dim.y));
        thread.lane = static_cast<int>(t % 32);
        thread.warp = static_cast<int>(t / 32);
    }
    block.warps.resize((count + 31) / 32);
    for (size_t w = 0; w < block.warps.size(); ++w)
        block.warps[w].size = static_cast<unsigned>(std::min<size_t>(32, count - 32 * w));
    std::vector<unsigned char> shared(shared_bytes + 16);
    block.shared = shared.data() + (16 - reinterpret_cast<uintptr_t>(shared.data()) % 16) % 16;
    std::mt19937_64 random(settings.seed);
    const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
    // Block b runs at position p = (a·b + c) mod blocks: reversed, shuffled (a odd and
    // coprime to blocks) or in order.
    uint64_t a = 1, c = 0;
    if (settings.schedule == Schedule::reverse) a = blocks - 1, c = blocks - 1;
    if (settings.schedule == Schedule::shuffle) {
        do a = random() % blocks | 1; while (std::gcd(a, blocks) != 1);
        c = random() % blocks;
    }
    struct Restore {
        Block* outer;
        ~Restore() { current_block = outer; }
    } restore{current_block};
    current_block = &block;
    try {
        for (uint64_t p = 0; p < blocks; ++p) {
            const uint64_t b = static_cast<uint64_t>((static_cast<unsigned __int128>(a) * p + c) % blocks);
            block.index = dim3(b % grid.x, b / grid.x % grid.y, b / (uint64_t(grid.x) * grid.y));
            std::memset(block.shared, 0xff, shared_bytes);
            run_block(block, random);
        }
    } catch (const Error& error) {
        throw Error(std::string(kernel) + ": " + error.what());
    }
}

}  // namespace tensor_peft::emu

// ---- Warp operations, atomics and the runtime calls csrc/cuda uses. A shuffle reads the
// lane it names, or its own value (source -1) where CUDA leaves the value unchanged.
template <typename T>
T __shfl_sync(unsigned mask, T value, int lane, int width = 32) {
    const int self = tensor_peft::emu::lane_of_thread();
    return tensor_peft::emu::warp_exchange("__shfl_sync", mask, value, self / width * width + lane % width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    const int self = tensor_peft::emu::lane_of_thread();
    return tensor_peft::emu::warp_exchange("__shfl_up_sync", mask, value,
                                           self % width >= static_cast<int>(delta) ? self - int(delta) : -1);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    const int self = tensor_peft::emu::lane_of_thread();
    return tensor_peft::emu::warp_exchange("__shfl_down_sync", mask, value,
                                           self % width + int(delta) < width ? self + int(delta) : -1);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    const int self = tensor_peft::emu::lane_of_thread(), source = self ^ lane_mask;
    return tensor_peft::emu::warp_exchange("__shfl_xor_sync", mask, value,
                                           source / width == self / width ? source : -1);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { tensor_peft::emu::warp_exchange("__syncwarp", mask, 0, -1); }

template <typename T>
T atomicAdd(T* address, T value) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, int> ||
                      std::is_same_v<T, unsigned> || std::is_same_v<T, unsigned long long>,
                  "CUDA has atomicAdd for float, double, int, unsigned and unsigned long long");
    const T old = *address;
    *address = old + value;
    return old;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }  // launches throw at once
inline const char* cudaGetErrorString(cudaError_t status) {
    return status == cudaSuccess ? "no error" : "invalid argument";
}
inline cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* count) {
    *count = 1;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
    *value = static_cast<int>(attribute == cudaDevAttrMaxSharedMemoryPerBlockOptin
                                  ? tensor_peft::emu::shared_optin_limit()
                                  : tensor_peft::emu::kDefaultSharedLimit);
    return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute, int value) {
    if (value < 0 || static_cast<size_t>(value) > tensor_peft::emu::shared_optin_limit()) return cudaErrorInvalidValue;
    tensor_peft::emu::shared_opt_ins[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
    return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t = nullptr) {
    std::memset(pointer, value, bytes);
    return cudaSuccess;
}
