"""The per-step GPU model of ``gpu_report.step_model``, counted by hand on a tiny layer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tensor_peft.gpu_report import step_model
from tensor_peft.gpu_report.step_model import HBM_BYTES_PER_S, TENSOR_FLOPS, step_kernels, step_seconds

M, N, TOKENS, R = 3, 5, 2, step_model.RANK


def test_lora_step_bytes_and_flops_by_hand():
    """3×5 layer, 2 tokens, bfloat16: forward GEMM reads x (10), W (15), writes y (6); the
    input-gradient GEMM reads g (6), W (15), writes ∂x (10); the side path moves x + 4y
    forward and g + x + 4∂x backward; flops 2·T·m·n per GEMM and 6·T·r·(m + n)."""
    kernels = step_kernels("lora", M, N, TOKENS)
    side = 2 * (10 + 4 * 6) + 2 * (6 + 10 + 4 * 10)
    assert sum(k.bytes for k in kernels) == 2 * 31 + 2 * 31 + side
    assert sum(k.flops for k in kernels) == 2 * (2 * TOKENS * M * N) + 6 * TOKENS * R * (M + N)
    expected = sum(max(k.bytes / HBM_BYTES_PER_S, k.flops / TENSOR_FLOPS) for k in kernels)
    assert step_seconds("lora", M, N, TOKENS) == pytest.approx(expected)


def test_liera_adds_gamma_and_four_bfloat16_merge_passes_and_a_backward_reading_two():
    """Beyond the base GEMMs: Γ's GEMM (reads g 6 and x 10, writes Γ 15), two merges (read
    W0, write W_eff: 4 bytes an entry each) and the merge backward (reads Γ and W0)."""
    base = sum(k.bytes for k in step_kernels("lora", M, N, TOKENS)) - (2 * (10 + 24) + 2 * (6 + 10 + 40))
    liera = sum(k.bytes for k in step_kernels("liera", M, N, TOKENS))
    assert liera == base + 2 * (6 + 10 + 15) + 2 * 4 * 15 + 4 * 15


def test_each_fusion_lowers_some_method_and_the_table_prints():
    for fusion, method, before, after in step_model.largest_fusions(4096, 4096, 512):
        assert fusion in step_model.FUSIONS and after < before
    with pytest.raises(ValueError, match="method must be one of"):
        step_kernels("dora", M, N, TOKENS)
    out = subprocess.run([sys.executable, "-m", "tensor_peft.gpu_report.floors", "--steps"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "| 4096×4096 | 512 | snell |" in out and "weight-in-tiles" in out
