// Large CPU buffers in transparent huge pages, where the kernel gives them on request
// (Linux, transparent_hugepage "madvise" or "always"): the first touch of fresh memory
// then faults once per 2 MiB instead of once per 4 KiB page. Touching a fresh m×n float32
// buffer in 4 KiB pages took as long as a pass over it (the faults serialize on the
// process's memory lock: more threads do not help). Advice only: the memory works the
// same without it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tensor_peft::cpu {

constexpr size_t kHugePage = size_t(1) << 21;

// Asks for huge pages over the 2 MiB-aligned part of [address, address + bytes), memory not
// touched yet (a buffer just allocated, such as a torch.empty output a kernel will write).
inline void advise_huge_pages(void* address, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(address) + kHugePage - 1) / kHugePage * kHugePage;
    const uintptr_t end = (reinterpret_cast<uintptr_t>(address) + bytes) / kHugePage * kHugePage;
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)address;
    (void)bytes;
#endif
}

// `bytes` of uninitialized memory, freed by std::free; a block of 2 MiB or more 2 MiB-aligned
// and in huge pages (advise_huge_pages).
inline void* allocate_memory(size_t bytes) {
    void* block = nullptr;
#if defined(__linux__)
    if (bytes >= kHugePage) {
        const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
        block = std::aligned_alloc(kHugePage, rounded);
        if (block != nullptr) advise_huge_pages(block, rounded);
    }
#endif
    if (block == nullptr && bytes > 0) block = std::malloc(bytes);
    if (block == nullptr && bytes > 0) throw std::bad_alloc();
    return block;
}

}  // namespace tensor_peft::cpu
