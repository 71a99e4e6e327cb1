"""``matrix_exp`` forward and forward + backward on each backend that runs here against
``torch.linalg.matrix_exp`` with autograd (the baseline), float32 batches of small
matrices, as LieRA's matrix groups use them."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends, ops

from .conftest import run

SHAPES = [(65536, 3, 3), (16384, 8, 8), (4096, 16, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("implementation", ["torch", "reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("step", ["forward", "forward+backward"])
def test_matrix_exp(benchmark, device, shape, implementation, step):
    if implementation != "torch":
        ops_here = backends.implemented_ops(implementation)
        if backends.why_unavailable(implementation, device) is not None or "matrix_exp" not in ops_here:
            pytest.skip(f"{implementation} cannot run matrix_exp on {device} here")
        if implementation == "triton" and device == "cpu":
            pytest.skip("the Triton interpreter is for correctness, not speed")
    generator = torch.Generator().manual_seed(0)
    A = (torch.randn(shape, generator=generator) / shape[-1]).to(device).requires_grad_()
    upstream = torch.randn(shape, generator=generator).to(device)
    exp = torch.linalg.matrix_exp if implementation == "torch" else ops.matrix_exp

    def body():
        out = exp(A)
        if step == "forward+backward":
            torch.autograd.grad(out, A, upstream)

    benchmark.group = f"matrix_exp {'x'.join(map(str, shape))} float32 {step} ({device})"
    if implementation == "torch":
        run(benchmark, body, device, baseline=True)
        return
    with backends.use(implementation):
        run(benchmark, body, device)
