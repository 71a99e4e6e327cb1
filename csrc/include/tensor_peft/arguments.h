// Checks of the raw arguments an extension function takes (pointers as integers, sizes),
// for host code that binds kernels with pybind11. The Python op layer passes valid ones;
// these keep a direct caller from crashing the process: a bad argument raises ValueError
// naming it. A non-null pointer to memory too small cannot be detected.
#pragma once

#include <pybind11/pybind11.h>

#include <climits>
#include <cstdint>
#include <string>

namespace tensor_peft::arguments {

// `value` ≥ 0.
inline int64_t size(int64_t value, const char* name) {
    if (value < 0)
        throw pybind11::value_error(std::string(name) + " must be non-negative, got " + std::to_string(value));
    return value;
}

// a·b, or ValueError when it does not fit in int64 (sizes already checked non-negative).
inline int64_t product(int64_t a, int64_t b, const char* what) {
    int64_t result;
    if (__builtin_mul_overflow(a, b, &result))
        throw pybind11::value_error(std::string(what) + " overflows 64 bits (" + std::to_string(a) + " × " +
                                    std::to_string(b) + ")");
    return result;
}

// `value` ≤ `limit` (a size a kernel holds in a narrower integer).
inline int64_t at_most(int64_t value, int64_t limit, const char* name) {
    if (value > limit)
        throw pybind11::value_error(std::string(name) + " must be at most " + std::to_string(limit) + ", got " +
                                    std::to_string(value));
    return value;
}

// `value` ≥ `limit` (a stride that must span a row).
inline int64_t at_least(int64_t value, int64_t limit, const char* name) {
    if (value < limit)
        throw pybind11::value_error(std::string(name) + " must be at least " + std::to_string(limit) + ", got " +
                                    std::to_string(value));
    return value;
}

// `value` in [low, high] (an enumeration: kernel, mode, epilogue).
inline int choice(int64_t value, int low, int high, const char* name) {
    if (value < low || value > high)
        throw pybind11::value_error(std::string(name) + " must be in [" + std::to_string(low) + ", " +
                                    std::to_string(high) + "], got " + std::to_string(value));
    return static_cast<int>(value);
}

// The pointer an integer address holds, unchecked (the CUDA binding's device addresses).
template <typename T>
T* ptr(std::uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

// The address of `count` values of T: non-null when count > 0 (an empty tensor may have a
// null address) and aligned for T.
template <typename T>
T* pointer(std::uintptr_t address, int64_t count, const char* name) {
    if (address == 0 && count > 0)
        throw pybind11::value_error(std::string(name) + " is a null pointer but must address " +
                                    std::to_string(count) + " values");
    if (address % alignof(T) != 0)
        throw pybind11::value_error(std::string(name) + " is not aligned for its dtype");
    return ptr<T>(address);
}

}  // namespace tensor_peft::arguments
