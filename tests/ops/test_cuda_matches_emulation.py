"""The CUDA kernels on a GPU against the same kernels under the CPU emulation of CUDA
(``cuda_emulated``), on the same inputs: the two runs of one source agree within the op
table's tolerances. Runs only where both backends can run (``benchmarks/gpu_check.sh``
builds both); ``-s`` prints each case's largest difference."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends

from ..backends.half_cases import HALF, assert_rounded_once
from .cases import BLOCK_CASES, CASES, Case
from .test_ops import _cast, _generator, _output_and_grads

pytestmark = pytest.mark.skipif(
    backends.why_unavailable("cuda", "cuda") is not None or backends.why_unavailable("cuda_emulated", "cpu") is not None,
    reason="needs the cuda backend on a GPU and the cuda_emulated backend",
)


def _to(args, kwargs, device):
    move = lambda t: t.detach().to(device).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return [[move(t) for t in a] if isinstance(a, list) else move(a) for a in args], {k: move(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("case", CASES + BLOCK_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_matches_emulation(case: Case, dtype):
    args, kwargs = case.make(dtype, "cpu", _generator(6))
    with backends.use("cuda_emulated"):
        emulated = _output_and_grads(case, args, kwargs, seed=7, round_upstream_to=dtype)
    with backends.use("cuda"):
        gpu = _output_and_grads(case, *_to(args, kwargs, "cuda"), seed=7, round_upstream_to=dtype)
    with backends.use("reference"):
        expected = _output_and_grads(case, args, kwargs, seed=7, round_upstream_to=dtype)
        exact = _output_and_grads(case, *_cast(args, kwargs, torch.float64), seed=7, round_upstream_to=dtype)
    differences = []
    for gpu_t, emulated_t, expected_t, exact_t in zip(
        [gpu[0], *gpu[1]], [emulated[0], *emulated[1]], [expected[0], *expected[1]], [exact[0], *exact[1]]
    ):
        assert gpu_t.dtype == emulated_t.dtype and gpu_t.shape == emulated_t.shape
        difference = (gpu_t.cpu().double() - emulated_t.double()).abs().max().item() if gpu_t.numel() else 0.0
        differences.append(difference)
        if dtype == torch.float64:
            torch.testing.assert_close(gpu_t.cpu(), emulated_t, rtol=1e-10, atol=1e-12)
        else:  # each may be off the exact result by twice the reference's float32 error
            reference_error = (expected_t.double() - exact_t).abs().max().item() if exact_t.numel() else 0.0
            assert difference <= 4 * reference_error + 2e-6 * exact_t.abs().max().item(), (difference, reference_error)
    print(f"{case.id} {dtype}: max |gpu - emulated| per output = {', '.join(f'{d:.3g}' for d in differences)}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", HALF)
def test_gpu_half_kernels_round_the_float32_result_once(case: Case, dtype):
    """The _f16/_bf16 kernels on a GPU (CUDA's conversion intrinsics): the reference's
    float32 results rounded once, as the emulator's are (tests/backends/test_cuda_half.py)."""
    args, kwargs = case.make(dtype, "cpu", _generator(6))
    with backends.use("cuda"):
        gpu = _output_and_grads(case, *_to(args, kwargs, "cuda"), seed=7, round_upstream_to=dtype)
    with backends.use("reference"):
        expected = _output_and_grads(case, *_cast(args, kwargs, torch.float32), seed=7, round_upstream_to=dtype)
    for gpu_t, expected_t in zip([gpu[0], *gpu[1]], [expected[0], *expected[1]]):
        assert gpu_t.dtype == dtype
        assert_rounded_once(gpu_t.cpu(), expected_t)
