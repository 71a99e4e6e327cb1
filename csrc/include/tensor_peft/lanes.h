// CPU only: SIMD vectors of float or double (GCC vector extensions, 256 bits: one AVX
// register, two SSE ones in the default clone) and how the matrix math of
// tensor_peft/expm.h runs on them, one matrix per lane (see Lanes in tensor_peft/expm_linalg.h).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

#include "tensor_peft/expm_linalg.h"

namespace tensor_peft::cpu {

template <typename T>
struct VectorOf;
template <>
struct VectorOf<float> {
    typedef float type __attribute__((vector_size(32)));
};
template <>
struct VectorOf<double> {
    typedef double type __attribute__((vector_size(32)));
};

// A vector of T, one value per lane.
template <typename T>
using Vector = typename VectorOf<T>::type;

struct Free {
    void operator()(void* memory) const { std::free(memory); }
};

// Uninitialized room for `count` values of a vector type V, 64-byte aligned. (Not
// std::vector: compiled for the default ISA, GCC aligns these 32-byte vectors to 16 bytes
// and std::vector allocates so, while the AVX clones load them with aligned moves.)
template <typename V>
std::unique_ptr<V[], Free> aligned_buffer(std::size_t count) {
    constexpr std::size_t alignment = 64;
    const std::size_t bytes = (count * sizeof(V) + alignment - 1) / alignment * alignment;
    V* memory = static_cast<V*>(std::aligned_alloc(alignment, bytes > 0 ? bytes : alignment));
    if (!memory) throw std::bad_alloc();
    return std::unique_ptr<V[], Free>(memory);
}

template <typename T>
struct VectorLanes {
    using V = Vector<T>;
    using Scalar = T;
    using Mask = decltype(V{} < V{});  // all bits set in a lane where true
    using Index = Mask;
    static constexpr int count = sizeof(V) / sizeof(T);
    static V magnitude(V x) { return x < V{} ? -x : x; }
    template <typename U>
    static U select(Mask mask, U if_true, U if_false) {
        return mask ? if_true : if_false;
    }
    static bool any(Mask mask) {
        typedef unsigned long long Words __attribute__((vector_size(32)));
        const Words words = reinterpret_cast<Words>(mask);
        return (words[0] | words[1] | words[2] | words[3]) != 0;
    }
    static bool all(Mask mask) { return !any(~mask); }
    static V broadcast(T x) { return V{} + x; }
    static Index index(int i) { return Index{} + i; }
    static T lane(V x, int l) { return x[l]; }
    static void set_lane(V& x, int l, T value) { x[l] = value; }
};

}  // namespace tensor_peft::cpu

namespace tensor_peft::expm {

template <>
struct Lanes<cpu::Vector<float>> : cpu::VectorLanes<float> {};
template <>
struct Lanes<cpu::Vector<double>> : cpu::VectorLanes<double> {};

}  // namespace tensor_peft::expm
