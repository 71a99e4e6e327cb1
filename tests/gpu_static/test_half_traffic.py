"""The bytes the GPU ops move on a bfloat16 model, with and without the op layer's
float32 copies (``python -m tensor_peft.gpu_report.floors --traffic``), counted by hand."""

import subprocess
import sys

import torch

from tensor_peft.gpu_report.floors import half_traffic, sparse_delta_bytes


def test_half_traffic_counts_each_weight_sized_read_and_write():
    numel = 1000
    rows = {name.split(" (")[0]: (before, after) for name, before, after in half_traffic(numel)}
    # a copy around one half input: read 2, write 4, the kernel reads 4 (10 bytes, not 2)
    assert rows["tucker_delta forward"] == (10 * numel, 2 * numel)
    assert rows["tucker_delta backward"] == (10 * numel, 2 * numel)
    assert rows["tucker_merge forward"] == (4 * numel, 4 * numel)  # took the half weight before
    assert rows["lowrank_hadamard_merge backward"] == (20 * numel, 4 * numel)
    assert rows["sparsify backward"] == (30 * numel, 6 * numel)
    float32_selection = sparse_delta_bytes(numel, torch.float32, int(numel * 0.04))
    # float32 κ and selection throughout, then the result read in float32 and written in half
    assert rows["kernelized_sparse_delta forward"] == (float32_selection + 6 * numel, float32_selection - 2 * numel)


def test_traffic_command_prints_both_tables():
    out = subprocess.run([sys.executable, "-m", "tensor_peft.gpu_report.floors", "--traffic"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "| 4096×11008 | float32 | 4.00% |" in out
    assert "| lowrank_hadamard_merge backward (reads Γ, W0) | MLP 4096×11008 | 902 | 300.6 | 180 | 60.1 |" in out
