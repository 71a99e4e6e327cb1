"""FLoRA ``auto`` (timed at first use, then cached) against its two paths, on conv and
linear layers of the shapes real models have: a training step (forward + backward) of
each path, the three interleaved step by step so that load on the machine hits them
alike. The benchmark row is auto's step; its notes give each path's median, the path
auto chose and auto's ratio to the faster path (the target: within 5%)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensor_peft as tp
from tensor_peft.nn import flora

from .conftest import interleaved_medians, run

LAYERS = {
    "conv64-3x3-b16-56x56-r16": (lambda: nn.Conv2d(64, 64, 3, padding=1), (16, 64, 56, 56), [16, 16, 2, 2]),
    "conv64-3x3-b16-28x28-r8": (lambda: nn.Conv2d(64, 64, 3, padding=1), (16, 64, 28, 28), [8, 8, 2, 2]),
    "conv256-3x3-b8-14x14-r8": (lambda: nn.Conv2d(256, 256, 3, padding=1), (8, 256, 14, 14), [8, 8, 2, 2]),
    "linear-768x3072-1576tok-r8": (lambda: nn.Linear(768, 3072), (8 * 197, 768), [8, 8]),
    "linear-128x344-512tok-r8": (lambda: nn.Linear(128, 344), (8, 64, 128), [8, 8]),
    "linear-2048x2048-16tok-r16": (lambda: nn.Linear(2048, 2048), (16, 2048), [16, 16]),
}
EXECUTIONS = ("merged", "factorized", "auto")


@pytest.mark.parametrize("layer", list(LAYERS))
def test_flora_auto_against_the_faster_path(benchmark, device, layer):
    make_base, shape, ranks = LAYERS[layer]
    torch.manual_seed(0)
    base = make_base().to(device)
    layers = {execution: tp.nn.FLoRALayer(base, ranks=ranks, execution=execution) for execution in EXECUTIONS}
    x = torch.randn(shape, device=device, requires_grad=True)
    flora.clear_execution_cache()

    def step(execution):
        out = layers[execution](x)
        out.backward(torch.ones_like(out))

    steps = {execution: (lambda execution=execution: step(execution)) for execution in EXECUTIONS}
    medians = interleaved_medians(steps, device, repeats=7)
    faster = min(("merged", "factorized"), key=medians.__getitem__)
    benchmark.group = f"FLoRA auto against its faster path, training step ({device})"
    run(benchmark, steps["auto"], device, rounds=3, layer=layer, chose=layers["auto"].last_execution,
        faster=faster, merged_ms=round(medians["merged"] * 1e3, 2),
        factorized_ms=round(medians["factorized"] * 1e3, 2), auto_ms=round(medians["auto"] * 1e3, 2),
        auto_vs_faster=f"{medians['auto'] / medians[faster]:.3f}x")  # fmt: skip
