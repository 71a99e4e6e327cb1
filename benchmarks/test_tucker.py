"""``tucker_merge`` (FLoRA's fused W0 + ΔW) on each backend that runs here, against the
memory floor: one read and one write of W0 at the copy bandwidth measured in this run."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends, ops

from .conftest import run

SHAPES = {"conv-512x512x3x3": ((512, 512, 3, 3), (16, 16, 2, 2)), "linear-768x3072": ((768, 3072), (8, 8))}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("step", ["forward", "forward+backward"])
def test_tucker_merge(benchmark, floors, device, shape, backend, step):
    if backends.why_unavailable(backend, device) is not None or "tucker_merge" not in backends.implemented_ops(backend):
        pytest.skip(f"{backend} cannot run tucker_merge on {device} here")
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter is for correctness, not speed")
    dims, ranks = SHAPES[shape]
    weight = torch.randn(dims, device=device)
    core = torch.randn(ranks, device=device, requires_grad=True)
    factors = [(torch.randn(d, r, device=device) / (2 * r) ** 0.5).requires_grad_() for d, r in zip(dims, ranks)]
    upstream = torch.randn(dims, device=device)

    def merge():
        out = ops.tucker_merge(weight, core, factors)
        if step == "forward+backward":
            torch.autograd.grad(out, [core, *factors], upstream)

    floor_bytes = 2 * weight.numel() * 4 * (2 if step == "forward+backward" else 1)  # + one read of Γ
    benchmark.group = f"tucker_merge {shape} {step} ({device})"
    with backends.use(backend):
        run(benchmark, merge, device, floor_s=floor_bytes / floors["copy_bytes_per_s"], baseline=backend == "reference")
