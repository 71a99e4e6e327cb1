"""Every public op: gradcheck of the reference in float64, the op wiring (forward and
backward ops, fake impls) by ``torch.library.opcheck``, the dtype policy, and every
other backend that can run here against the reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tensor_peft import backends, ops

from ..conftest import DEVICES
from .cases import BLOCK_CASES, CASES, Case

case_param = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tensors(args, kwargs):
    """Every tensor of the call, in order (lists flattened)."""
    flat = [*args, *kwargs.values()]
    flat = [t for item in flat for t in (item if isinstance(item, list) else [item])]
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _grad_inputs(args, kwargs):
    return [t for t in _tensors(args, kwargs) if t.requires_grad]


def _output_and_grads(case: Case, args, kwargs, seed: int, round_upstream_to=torch.float64):
    """The op's output and the gradients of <output, random upstream> w.r.t. its inputs."""
    out = case.op(*args, **kwargs)
    upstream = torch.randn(out.shape, generator=_generator(seed)).to(round_upstream_to)
    inputs = _grad_inputs(args, kwargs)
    grads = torch.autograd.grad(out, inputs, upstream.to(out.dtype).to(out.device))
    return out, grads


@case_param
@pytest.mark.parametrize("backend", backends.available("cpu"))
def test_gradcheck(case: Case, backend: str):
    """Each backend's explicit backward is the derivative of its forward (float64)."""
    if not case.smooth:
        pytest.skip("stop-gradients make this op's gradient differ from the derivative")
    args, kwargs = case.make(torch.float64, "cpu", _generator(1))
    inputs = _grad_inputs(args, kwargs)

    def call(*values):
        replacement = dict(zip(map(id, inputs), values))
        swap = lambda t: replacement.get(id(t), t) if isinstance(t, torch.Tensor) else t  # noqa: E731
        new_args = [[swap(t) for t in a] if isinstance(a, list) else swap(a) for a in args]
        return case.op(*new_args, **{k: swap(v) for k, v in kwargs.items()})

    with backends.use(backend):
        assert torch.autograd.gradcheck(call, inputs)


class _CaptureOps(TorchDispatchMode):
    """Records every ``tensor_peft::`` op called below autograd, with its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "tensor_peft":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _fresh(value, requires_grad: bool):
    """A copy of an op input; tensors keep requires_grad only where asked."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(requires_grad and value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_fresh(v, requires_grad) for v in value)
    return value


@case_param
def test_opcheck(case: Case):
    """Schema, fake impl, autograd registration and compile tracing of each registered
    op the public op calls, forward and backward (torch.library.opcheck)."""
    args, kwargs = case.make(torch.float64, "cpu", _generator(2))
    with _CaptureOps() as capture:
        _output_and_grads(case, args, kwargs, seed=3)
    names = {func.name() for func, _, _ in capture.calls}
    assert any(name.endswith("_backward") for name in names), names
    for func, op_args, op_kwargs in capture.calls:
        # backward ops have no autograd formula of their own (no double backward)
        differentiable = not func.name().endswith("_backward")
        torch.library.opcheck(
            func, _fresh(op_args, differentiable), _fresh(op_kwargs, differentiable)
        )


def _cast(args, kwargs, dtype):
    """Copies of the call's tensors in ``dtype``, keeping requires_grad."""
    cast = lambda t: t.detach().to(dtype).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return [[cast(t) for t in a] if isinstance(a, list) else cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}


@case_param
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(case: Case, dtype):
    """Half inputs give half results and gradients (in the inputs' dtype) equal to the
    float32 computation rounded once."""
    args, kwargs = case.make(dtype, "cpu", _generator(4))
    out, grads = _output_and_grads(case, args, kwargs, seed=5, round_upstream_to=dtype)
    out32, grads32 = _output_and_grads(case, *_cast(args, kwargs, torch.float32), seed=5, round_upstream_to=dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out, out32.to(dtype), rtol=0, atol=0)
    for grad, grad32, tensor in zip(grads, grads32, _grad_inputs(args, kwargs)):
        assert grad.dtype == tensor.dtype
        torch.testing.assert_close(grad, grad32.to(dtype), rtol=0, atol=0)


def _other_backends():
    """(backend, device) pairs besides the reference that can run here."""
    return [
        (name, device)
        for device in DEVICES
        for name in backends.available(device)
        if name != "reference"
    ]


@pytest.mark.parametrize("case", CASES + BLOCK_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("backend,device", _other_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_matches_reference(case: Case, backend: str, device: str, dtype):
    """Forward and every gradient of each backend against the reference: within 1e-10 in
    float64; in float32 no further from the exact (float64) result than twice the
    reference's own float32 error (long float32 reductions round differently)."""
    args, kwargs = case.make(dtype, device, _generator(6))
    with backends.use(backend):
        got = _output_and_grads(case, args, kwargs, seed=7, round_upstream_to=dtype)
    with backends.use("reference"):
        expected = _output_and_grads(case, args, kwargs, seed=7, round_upstream_to=dtype)
        exact = _output_and_grads(case, *_cast(args, kwargs, torch.float64), seed=7, round_upstream_to=dtype)
    for got_t, expected_t, exact_t in zip([got[0], *got[1]], [expected[0], *expected[1]], [exact[0], *exact[1]]):
        assert got_t.dtype == expected_t.dtype and got_t.shape == expected_t.shape
        if dtype == torch.float64:
            torch.testing.assert_close(got_t, expected_t, rtol=1e-10, atol=1e-12)
        else:
            error = (got_t.double() - exact_t).abs().max().item()
            reference_error = (expected_t.double() - exact_t).abs().max().item()
            assert error <= 2 * reference_error + 1e-6 * exact_t.abs().max().item(), (error, reference_error)


@pytest.mark.parametrize("backend,device", [*_other_backends(), ("reference", "cpu")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tucker_merge_of_a_half_weight_equals_the_float32_merge_rounded_once(backend: str, device: str, dtype):
    """A float16/bfloat16 weight with float32 factors (a half model's FLoRA merge), which
    the backend takes in its own dtype: the result is, bit for bit, the merge of the
    float32 weight rounded once to the weight's dtype, and the factors' gradients are
    those of the float32 merge."""
    generator = _generator(9)
    weight = torch.randn(37, 70, 3, generator=generator).to(dtype).to(device)
    core = torch.randn(4, 5, 2, generator=generator).to(device).requires_grad_()
    factors = [torch.randn(d, r, generator=generator).to(device).requires_grad_() for d, r in ((37, 4), (70, 5), (3, 2))]
    upstream = torch.randn(37, 70, 3, generator=generator).to(dtype).to(device)
    with backends.use(backend):
        merged = ops.tucker_merge(weight, core, factors, 0.7)
        grads = torch.autograd.grad(merged, [core, *factors], upstream)
        merged32 = ops.tucker_merge(weight.float(), core, factors, 0.7)
        grads32 = torch.autograd.grad(merged32, [core, *factors], upstream.float())
    assert merged.dtype == dtype
    torch.testing.assert_close(merged, merged32.to(dtype), rtol=0, atol=0)
    for grad, grad32 in zip(grads, grads32):
        torch.testing.assert_close(grad, grad32, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", [*_other_backends(), ("reference", "cpu")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tucker_merge_rounds_a_half_weight_to_nearest_even(backend: str, device: str, dtype):
    """Ties (halfway between two values of the weight's dtype) round to the even one,
    values past the largest finite to inf, NaN stays NaN: torch's conversion of the
    float32 sums."""
    eps = torch.finfo(dtype).eps
    largest = torch.finfo(dtype).max
    sums = torch.tensor([1 + eps / 2, 1 + 3 * eps / 2, -(1 + eps / 2), 2 - eps / 4, largest * (1 + eps / 4),
                         largest * (1 + eps), float("nan"), float("-inf"), 0.0, 1e-30, 0.1, 1 / 3])  # fmt: skip
    weight = torch.ones(sums.numel(), 1, dtype=dtype, device=device)
    core, factors = torch.ones(1, 1, device=device), [(sums - 1).reshape(-1, 1).to(device), torch.ones(1, 1, device=device)]
    with backends.use(backend):
        merged = ops.tucker_merge(weight, core, factors, 1.0)
    expected = (weight.float() + factors[0]).to(dtype)
    torch.testing.assert_close(merged, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend,device", [*_other_backends(), ("reference", "cpu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_hadamard_merge_over_the_whole_range_of_exp(backend: str, device: str, dtype):
    """W0 ⊙ exp(ΔW) with ΔW = B·A exact (B = 1, rank 1) across exp's whole range, from
    underflow to 0 through subnormal results to overflow to inf: within 1 ulp-ish of
    torch.exp, and 0 and inf exactly where torch.exp gives them."""
    info = torch.finfo(dtype)
    low, high = math.log(info.tiny * info.eps) - 2, math.log(info.max) + 2
    A = torch.linspace(low, high, 997, dtype=dtype, device=device).reshape(1, -1)
    weight, B = torch.ones(3, 997, dtype=dtype, device=device), torch.ones(3, 1, dtype=dtype, device=device)
    with backends.use(backend):
        merged = ops.lowrank_hadamard_merge(weight, B, A, 1.0, exp="exact")
    expected = torch.exp(A).expand(3, -1)
    assert torch.equal(merged == 0, expected == 0) and torch.equal(merged.isinf(), expected.isinf())
    finite = (expected != 0) & expected.isfinite() & (expected >= info.tiny)  # normal results
    torch.testing.assert_close(merged[finite], expected[finite], rtol=4 * info.eps, atol=0)
