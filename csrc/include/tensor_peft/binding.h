// The numbers the kernels of both extensions (_C, _cuda) take for names, exported to
// Python by their pybind11 modules.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>

#include "tensor_peft/kernelized.h"
#include "tensor_peft/lowrank.h"

namespace tensor_peft::binding {

// {name: number} of a table of names indexed by number.
template <std::size_t N>
pybind11::dict ids(const char* const (&names)[N]) {
    pybind11::dict table;
    for (std::size_t id = 0; id < N; ++id) table[names[id]] = static_cast<int>(id);
    return table;
}

// KERNEL_IDS, MODE_IDS (SNELL) and EPILOGUE_IDS (the ΔW = scale·U·R kernels) on module m.
inline void export_ids(pybind11::module_& m) {
    m.attr("KERNEL_IDS") = ids(kernelized::kKernelNames);
    m.attr("MODE_IDS") = ids(kernelized::kModeNames);
    m.attr("EPILOGUE_IDS") = ids(lowrank::kEpilogueNames);
}

}  // namespace tensor_peft::binding
