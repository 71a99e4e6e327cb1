// The epilogues of the kernels for updates ΔW = scale·U·R (csrc/cpu/lowrank.cpp,
// csrc/cuda/lowrank.cu): how out is made from W0 and ΔW. The bindings export the numbers
// to Python as EPILOGUE_IDS, by the names of LieRA's forms ("exact" is exp).
//   add      out = W0 + ΔW (or ΔW alone when W0 is null)    Tucker (FLoRA)
//   exp      out = W0 ⊙ exp(ΔW)                             LieRA exact
//   taylor1  out = W0 ⊙ (1 + ΔW)                            LieRA taylor1
#pragma once

namespace tensor_peft::lowrank {

enum Epilogue : int { kAdd = 0, kExp = 1, kTaylor1 = 2 };

// Python's names, indexed by the numbers above.
constexpr const char* kEpilogueNames[] = {"add", "exact", "taylor1"};

}  // namespace tensor_peft::lowrank
