"""Float16/bfloat16 on the CUDA kernels, run on CPU tensors by the cuda_emulated backend:
the conversions of csrc/cuda/half.h against torch's, every op forward and backward against
the reference computed in float32 and rounded once, the kernels handed the half tensors
themselves (no upcast copy), and the race check of the half kernels."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tensor_peft import backends
from tensor_peft.backends import cuda, native
from tensor_peft.nn import LieRALayer

from ..ops.cases import CASES, Case
from .half_cases import HALF, assert_rounded_once, half_calls, leaves

pytestmark = pytest.mark.skipif(
    backends.why_unavailable("cuda_emulated", "cpu") is not None,
    reason=f"cuda_emulated: {backends.why_unavailable('cuda_emulated', 'cpu')}",
)


def _edge_floats() -> torch.Tensor:
    """float32 values at the boundaries of both half types: ties between neighbours,
    the largest finite values and where rounding overflows, subnormals, ±0, ±inf, NaN."""
    special = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.99, 65520.0, 65536.0,
               2.0**-14, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 3.0 * 2.0**-25, 2.0**-149, 1e-40,
               torch.finfo(torch.float32).max, torch.finfo(torch.bfloat16).max, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8,
               1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11]  # fmt: skip
    values = torch.tensor(special, dtype=torch.float32)
    return torch.cat([values, -values])


def _random_floats(count: int) -> torch.Tensor:
    """Random float32 bit patterns (every exponent, NaNs among them), and random values
    exactly halfway between two neighbours of each half type."""
    g = torch.Generator().manual_seed(21)
    bits = torch.randint(-(2**31), 2**31, (count,), generator=g, dtype=torch.int64).to(torch.int32)
    halfway = []
    for dtype, dropped in ((torch.bfloat16, 16), (torch.float16, 13)):
        neighbours = torch.randn(count // 8, generator=g).to(dtype).float().view(torch.int32)
        halfway.append((neighbours | (1 << (dropped - 1))).view(torch.float32))
    return torch.cat([bits.view(torch.float32), *halfway])


def _same_values(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal values, NaN where NaN (its payload and the sign of a zero sum are free)."""
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan], expected[~nan])


@pytest.mark.parametrize("dtype", HALF)
def test_stores_round_as_torch_does(emulator, dtype):
    """narrow: lowrank_forward with U = 1, R = x and no weight stores x rounded once into
    the half dtype: torch's rounding (to nearest even) of every value, edge cases included."""
    x = torch.cat([_edge_floats(), _random_floats(4096)])
    out, U = torch.empty(1, x.numel(), dtype=dtype), torch.ones(1, 1)
    kernel = native.cuda_kernels(native.CUDA_EMULATED, dtype).lowrank_forward
    kernel(out=out.data_ptr(), weight=0, U=U.data_ptr(), R=x.data_ptr(), d0=1, r0=1, n=x.numel(),
           scale=1.0, epilogue=emulator.EPILOGUE_IDS["add"], stream=0)  # fmt: skip
    expected = x.to(dtype)
    _same_values(out[0], expected)
    finite = expected.isfinite() & (expected != 0)
    assert torch.equal(out[0][finite].view(torch.int16), expected[finite].view(torch.int16))  # bit for bit


@pytest.mark.parametrize("dtype", HALF)
def test_loads_widen_exactly(emulator, dtype):
    """widen: lowrank_backward with U = 1 adds each entry of a half Γ into a float32 dR:
    every one of the 65536 bit patterns gives torch's float32 value."""
    grad = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, -1)
    U, R, d_U, d_R = torch.ones(1, 1), torch.zeros(grad.shape), torch.zeros(1, 1), torch.zeros(grad.shape)
    kernel = native.cuda_kernels(native.CUDA_EMULATED, dtype).lowrank_backward
    kernel(grad=grad.data_ptr(), weight=0, U=U.data_ptr(), R=R.data_ptr(),
           d0=1, r0=1, n=grad.numel(), scale=1.0, epilogue=emulator.EPILOGUE_IDS["add"], dU=d_U.data_ptr(),
           dR=d_R.data_ptr(), stream=0)  # fmt: skip
    _same_values(d_R[0], grad[0].float())


@pytest.fixture
def launched(monkeypatch) -> list[tuple[str, torch.dtype, set[int]]]:
    """(kernel, storage dtype, the addresses passed) of every launch of the cuda backends' kernels."""
    seen: list[tuple[str, torch.dtype, set[int]]] = []
    cuda_kernels = cuda.cuda_kernels

    def recorded(name, dtype, kernel):
        def launch(**arguments):
            seen.append((name, dtype, {value for value in arguments.values() if isinstance(value, int)}))
            return kernel(**arguments)

        return launch

    def spy(extension, dtype):
        kernels = cuda_kernels(extension, dtype)
        return dataclasses.replace(kernels, **{field.name: recorded(field.name, dtype, getattr(kernels, field.name))
                                               for field in dataclasses.fields(kernels)
                                               if getattr(kernels, field.name) is not None})  # fmt: skip

    monkeypatch.setattr(cuda, "cuda_kernels", spy)
    return seen


# Ops whose half input is one of the large tensors (W0, delta) the kernels read as it is;
# the small ones (factors, embeddings) are cast to float32 by the launchers.
LARGE_INPUT = ("tucker_merge", "lowrank_hadamard_merge", "sparsify")


@pytest.mark.parametrize("op", [op for op in half_calls(torch.float16) if op != "matrix_exp"])
@pytest.mark.parametrize("dtype", HALF)
def test_kernels_read_and_write_the_half_tensors_themselves(op, dtype, launched):
    """No upcast copy of the large tensors: a half W0 or delta reaches a _bf16/_f16 kernel
    as it is, the output the op returns is the half tensor a kernel wrote, and the
    backward's kernels read the upstream gradient itself."""
    call, read = half_calls(dtype)[op]

    def addresses() -> set[int]:
        return {address for name, storage, passed in launched if storage == dtype for address in passed}

    with backends.use("cuda_emulated"):
        out = call()
        if op in LARGE_INPUT:
            assert read.data_ptr() in addresses()
        assert out.data_ptr() in addresses()
        upstream = torch.randn(out.shape).to(dtype)
        launched.clear()
        out.backward(upstream)
        assert upstream.data_ptr() in addresses()


@pytest.mark.parametrize("dtype", HALF)
def test_matrix_exp_of_a_half_matrix_runs_the_float32_kernel(dtype, launched):
    """matrix_exp computes in float32 for a half A (csrc/cuda/expm.cu has no half kernel)
    and returns A's dtype."""
    _, A = half_calls(dtype)["matrix_exp"]
    with backends.use("cuda_emulated"):
        out = half_calls(dtype)["matrix_exp"][0]()
    assert out.dtype == dtype
    assert {storage for name, storage, _ in launched if name.startswith("matrix_exp")} == {torch.float32}


@pytest.mark.parametrize("dtype", HALF)
def test_liera_forward_hands_the_half_weight_to_the_merge_kernel(dtype, launched):
    """A half LieRA layer (hadamard group, inner LoRA) on an input of its dtype: the merge
    kernel reads the frozen weight itself (no float32 copy of W0) and the output and the
    adapter's gradients are the reference backend's, whose op computes in float32 too."""
    generator = torch.Generator().manual_seed(17)
    layer = LieRALayer(torch.nn.Linear(20, 12).to(dtype), r=2, alpha=1.0)
    with torch.no_grad():
        for parameter in layer.adapters["default"].parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    x = torch.randn(3, 20, generator=generator).to(dtype)
    parameters, results = list(layer.adapters["default"].parameters()), {}
    for backend in ("cuda_emulated", "reference"):
        with backends.use(backend):
            out = layer(x)
            results[backend] = [out, *torch.autograd.grad(out.float().sum(), parameters)]
    assert layer.weight.data_ptr() in {address for name, storage, passed in launched if storage == dtype
                                       for address in passed}  # fmt: skip
    for got, expected in zip(results["cuda_emulated"], results["reference"]):
        assert got.dtype == expected.dtype
        assert_rounded_once(got, expected.float())


def _run(case: Case, dtype: torch.dtype):
    args, kwargs = case.make(dtype, "cpu", torch.Generator().manual_seed(5))
    with backends.use("cuda_emulated"):
        out = case.op(*args, **kwargs)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
        return [out, *torch.autograd.grad(out, leaves(args, kwargs), upstream)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", HALF)
def test_half_kernels_agree_across_schedules(emulator, case, dtype):
    """The race check on the half kernels: reversed and shuffled runs give the forward
    run's output bit for bit, and gradients summed with float32 atomics that differ at
    most by the order of the sums before their one rounding (one half ulp)."""
    expected = _run(case, dtype)
    for order, seed in (("reverse", 0), ("shuffle", 11)):
        emulator.set_schedule(order, seed)
        try:
            got = _run(case, dtype)
        finally:
            emulator.set_schedule("forward", 0)
        assert torch.equal(got[0], expected[0]), order
        for grad, other in zip(expected[1:], got[1:]):
            sums = 64 * torch.finfo(torch.float32).eps * float(grad.abs().max())
            torch.testing.assert_close(other.float(), grad.float(), rtol=torch.finfo(dtype).eps, atol=sums)
