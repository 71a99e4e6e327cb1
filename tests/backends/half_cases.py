"""What the float16/bfloat16 tests of the backends that take half tensors (triton,
cuda_emulated) share: the float32 reference rounded once, and op calls on half inputs."""

from __future__ import annotations

import torch

from tensor_peft import backends, ops

from ..ops.cases import Case

HALF = [torch.float16, torch.bfloat16]


def leaves(args, kwargs) -> list[torch.Tensor]:
    flat = [t for item in [*args, *kwargs.values()] for t in (item if isinstance(item, list) else [item])]
    return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]


def as_float32(args, kwargs):
    """Copies of the call's tensors in float32 (exact for half values), keeping requires_grad."""

    def cast(value):
        return value.detach().float().requires_grad_(value.requires_grad) if isinstance(value, torch.Tensor) else value

    args = [[cast(t) for t in a] if isinstance(a, list) else cast(a) for a in args]
    return args, {k: cast(v) for k, v in kwargs.items()}


def assert_rounded_once(got: torch.Tensor, expected: torch.Tensor) -> None:
    """``got`` is the float32 ``expected`` rounded once to got's dtype: within one unit in
    the last place of that dtype (the two float32 computations differ by a few float32
    roundings, which may fall on either side of a rounding boundary), plus float32 noise
    where a sum cancels."""
    rounded = expected.to(got.dtype).float()
    bound = torch.finfo(got.dtype).eps * rounded.abs() + 1e-5 * expected.abs().max()
    assert ((got.float() - rounded).abs() <= bound).all(), (got, rounded)


def output_and_grads(case: Case, args, kwargs, upstream: torch.Tensor):
    out = case.op(*args, **kwargs)
    return [out, *torch.autograd.grad(out, leaves(args, kwargs), upstream.to(out.dtype))]


def check_case_rounded_once(backend: str, case: Case, dtype: torch.dtype) -> None:
    """``case`` on ``backend`` with half inputs: the output and every gradient in the half
    dtype, each the reference's float32 result rounded once."""
    generator = torch.Generator().manual_seed(11)
    args, kwargs = case.make(dtype, "cpu", generator)
    out_shape = case.op(*args, **kwargs).shape
    upstream = torch.randn(out_shape, generator=generator).to(dtype)
    with backends.use(backend):
        got = output_and_grads(case, args, kwargs, upstream)
    with backends.use("reference"):
        expected = output_and_grads(case, *as_float32(args, kwargs), upstream)
    for got_t, expected_t in zip(got, expected):
        assert got_t.dtype == dtype
        assert_rounded_once(got_t, expected_t)


def check_mixed_rounded_once(backend: str, op: str, dtype: torch.dtype) -> None:
    """``mixed_calls``' ``op`` on ``backend``: the result in the half dtype and each gradient
    in its input's dtype, the reference's float32 results rounded once."""
    function, args, kwargs = mixed_calls(dtype)[op]()
    inputs = leaves(args, kwargs)
    results = {}
    for name in (backend, "reference"):
        with backends.use(name):
            out = function(*args, **kwargs)
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(16)).to(dtype)
            results[name] = [out, *torch.autograd.grad(out, inputs, upstream)]
    for got, expected, tensor in zip(results[backend], results["reference"], [args[0], *inputs]):
        assert got.dtype == expected.dtype == tensor.dtype
        assert_rounded_once(got, expected.float())


def mixed_calls(dtype):
    """Calls with a half main input beside float32 ones (a half model's frozen weight or
    embeddings with float32 adapter parameters)."""
    g = torch.Generator().manual_seed(15)
    randn = lambda *shape, dtype=dtype: torch.randn(shape, generator=g).mul(0.5).to(dtype).requires_grad_()  # noqa: E731
    f32 = torch.float32
    weight, B, A = randn(37, 20).detach(), randn(37, 3, dtype=f32), randn(3, 20, dtype=f32)
    core, factors = randn(3, 4), [randn(37, 3, dtype=f32), randn(20, 4, dtype=f32)]
    out_emb, in_emb, coeff = randn(2, 9, 3), randn(2, 8, 3, dtype=f32), randn(2, dtype=f32)
    return {
        "lowrank_hadamard_merge": lambda: (ops.lowrank_hadamard_merge, (weight, B, A, 0.7), {}),
        "tucker_delta": lambda: (ops.tucker_delta, (core, factors, 1.3), {}),
        "kernelized_sparse_delta": lambda: (ops.kernelized_sparse_delta, (out_emb, in_emb, 0.4),
                                            {"kernel": "piecewise_linear", "mode": "soft", "coeff": coeff}),
    }  # fmt: skip


def half_calls(dtype):
    """(op on half tensors, the tensor its kernel must read in place)."""
    g = torch.Generator().manual_seed(13)
    randn = lambda *shape: torch.randn(shape, generator=g).mul(0.5).to(dtype).requires_grad_()  # noqa: E731
    weight, core, factors = randn(5, 6).detach(), randn(2, 3), [randn(5, 2), randn(6, 3)]
    B, A, square, delta = randn(5, 2), randn(2, 6), randn(2, 4, 4), randn(5, 6)
    out_emb, in_emb = randn(2, 5, 3), randn(2, 6, 3)
    return {
        "tucker_delta": (lambda: ops.tucker_delta(core, factors), factors[0]),
        "tucker_merge": (lambda: ops.tucker_merge(weight, core, factors), weight),
        "lowrank_hadamard_merge": (lambda: ops.lowrank_hadamard_merge(weight, B, A, 0.7), weight),
        "matrix_exp": (lambda: ops.matrix_exp(square), square),
        "sparsify": (lambda: ops.sparsify(delta, 0.5, "soft"), delta),
        "kernelized_delta": (lambda: ops.kernelized_delta(out_emb, in_emb, "rbf"), out_emb),
        "kernelized_sparse_delta": (lambda: ops.kernelized_sparse_delta(out_emb, in_emb, 0.5, "mixture"), out_emb),
    }  # fmt: skip
