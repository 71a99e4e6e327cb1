"""Float16/bfloat16 on the triton backend (on CPU tensors through Triton's interpreter):
every op, forward and backward, against the reference computed in float32 and rounded
once to the half dtype; and the op layer hands the kernels the half tensors themselves,
with no upcast copy, and returns what they wrote."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends
from tensor_peft.backends import registry
from tensor_peft.backends.kernelized_ops import KernelProblem
from tensor_peft.backends.triton import expm, kernelized, lowrank, select

from ..ops import test_ops as op_tests
from ..ops.cases import CASES, Case
from .half_cases import HALF, assert_rounded_once, half_calls, leaves

pytestmark = pytest.mark.skipif(
    backends.why_unavailable("triton", "cpu") is not None, reason="the triton backend does not run on cpu tensors here"
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fake_implementations_match_the_half_path(case: Case):
    """Each registered op the public op calls on bfloat16 inputs on the triton backend,
    forward and backward, has a fake implementation giving its outputs' shapes and dtypes
    (thresholds in float32, the rest in their inputs' dtypes): torch.compile and meta
    tensors see what runs."""
    args, kwargs = case.make(torch.bfloat16, "cpu", torch.Generator().manual_seed(14))
    with backends.use("triton"), op_tests._CaptureOps() as capture:
        out = case.op(*args, **kwargs)
        torch.autograd.grad(out, leaves(args, kwargs), torch.ones_like(out))
    assert capture.calls
    for func, op_args, op_kwargs in capture.calls:
        with backends.use("triton"):
            torch.library.opcheck(func, op_args, op_kwargs, test_utils=("test_faketensor",))


@pytest.mark.parametrize("dtype", HALF)
def test_sparse_linear_backward_of_half_embeddings(dtype):
    """The triton backend's sparse_linear_backward (the op layer gives it float32/float64:
    sparse_linear sums W0 + ΔW in the compute dtype) on half embeddings: the reference's
    float32 gradients rounded once, and ∂input = grad_out·ΔW from the sparsified ΔW rounded
    once (each entry within one unit in the last place of the half dtype)."""
    generator = torch.Generator().manual_seed(12)
    out_emb, in_emb = (torch.randn(2, size, 3, generator=generator).mul(0.6).to(dtype) for size in (7, 6))
    grad_out, tokens = torch.randn(5, 7, generator=generator), torch.randn(5, 6, generator=generator)
    coeff, params = torch.tensor([0.1, -0.1]), torch.tensor([1.0, 0.0, 1.5])
    reference = registry.kernel("sparse_linear_backward", "reference")
    reference_forward = registry.kernel("kernelized_sparse_delta", "reference")
    problem = KernelProblem(out_emb, in_emb, "mixture", coeff, params, 1e-12, "soft")
    widened = problem._replace(out_emb=out_emb.float(), in_emb=in_emb.float())
    tau = reference_forward(widened, 21)[1]
    triton_backward = registry.kernel("sparse_linear_backward", "triton")
    got_input, *got = triton_backward(grad_out, tokens, None, problem, 0.5, tau, grad_out)
    _, *expected = reference(grad_out, tokens, None, widened, 0.5, tau, grad_out)
    for got_t, expected_t, dtype_t in zip(got, expected, [dtype, dtype, torch.float32, torch.float32]):
        assert got_t.dtype == dtype_t
        assert_rounded_once(got_t, expected_t)
    delta = reference_forward(widened, 0, tau)[0]
    rounded = delta.to(dtype).float()
    bound = grad_out.abs() @ (torch.finfo(dtype).eps * rounded.abs()) + 1e-5
    assert got_input.dtype == torch.float32
    assert ((got_input - grad_out @ rounded).abs() <= bound).all()


KERNELS = [(lowrank, "merge_kernel"), (lowrank, "backward_kernel"), (expm, "expm_kernel"),
           *((kernelized, name) for name in ("delta_kernel", "columns_kernel", "backward_kernel")),
           *((select, name) for name in ("count_kernel", "refine_kernel", "mask_kernel"))]  # fmt: skip


@pytest.fixture
def launched(monkeypatch) -> set[tuple[int, torch.dtype]]:
    """(data pointer, dtype) of every tensor the triton kernels are launched with."""
    seen: set[tuple[int, torch.dtype]] = set()

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update((a.data_ptr(), a.dtype) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
                return self.kernel[grid](*args, **kwargs)

            return launch

    for module, name in KERNELS:
        monkeypatch.setattr(module, name, Spy(getattr(module, name)))
    return seen


@pytest.mark.parametrize("op", list(half_calls(torch.float16)))
@pytest.mark.parametrize("dtype", HALF)
def test_kernels_read_and_write_the_half_tensors_themselves(op, dtype, launched):
    """No upcast copy on the triton path: the kernels are launched with the op's half
    input itself, the output the op returns is the half tensor a kernel wrote, and the
    backward's kernels read the upstream gradient itself."""
    call, read = half_calls(dtype)[op]
    with backends.use("triton"):
        out = call()
        assert (read.data_ptr(), dtype) in launched
        assert (out.data_ptr(), dtype) in launched
        upstream = torch.randn(out.shape).to(dtype)
        launched.clear()
        out.backward(upstream)
        assert (upstream.data_ptr(), dtype) in launched
