"""Every op on float16/bfloat16 inputs, forward and backward, on each backend whose kernels
take half tensors (triton through its interpreter, cuda_emulated): the float32 reference
rounded once to the half dtype, alone and beside float32 inputs (``half_cases``)."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends

from ..ops.cases import CASES, Case
from .half_cases import HALF, check_case_rounded_once, check_mixed_rounded_once, mixed_calls

BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(backends.why_unavailable(name, "cpu") is not None,
                                                reason=f"{name}: {backends.why_unavailable(name, 'cpu')}"))
    for name in ("triton", "cuda_emulated")
]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", HALF)
def test_half_inputs_equal_the_float32_reference_rounded_once(backend, case: Case, dtype):
    check_case_rounded_once(backend, case, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(mixed_calls(torch.float16)))
@pytest.mark.parametrize("dtype", HALF)
def test_half_beside_float32_inputs(backend, op, dtype):
    check_mixed_rounded_once(backend, op, dtype)
