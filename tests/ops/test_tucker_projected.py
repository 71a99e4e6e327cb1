"""``tucker_projected_backward``: FLoRA's Tucker gradients from projections of the weight
gradient, on every backend that runs here, against autograd through an einsum."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends
from tensor_peft.ops.tucker_delta import tucker_projected_backward

from ..conftest import backends_with

LETTERS = "abcdefgh"


def _einsum_tucker(core, factors, scale):
    ranks, dims = LETTERS[: core.dim()], LETTERS[core.dim() : 2 * core.dim()].upper()
    spec = ",".join([ranks] + [d + r for d, r in zip(dims, ranks)]) + "->" + dims
    return scale * torch.einsum(spec, core, *factors)


@pytest.mark.parametrize(("backend", "device"), backends_with("tucker_projected_backward"))
@pytest.mark.parametrize(("shape", "ranks"), [((6, 5), (3, 2)), ((5, 4, 3, 2), (2, 3, 2, 1))])
def test_projected_gradients_equal_those_of_the_weight_gradient(backend, device, shape, ranks):
    generator = torch.Generator().manual_seed(len(shape))
    core = torch.randn(ranks, generator=generator, dtype=torch.float64, requires_grad=True)
    factors = [torch.randn(d, r, generator=generator, dtype=torch.float64, requires_grad=True)
               for d, r in zip(shape, ranks)]  # fmt: skip
    grad = torch.randn(shape, generator=generator, dtype=torch.float64)
    expected = torch.autograd.grad(_einsum_tucker(core, factors, 0.7), [core, *factors], grad)
    U0, U1 = factors[0].detach(), factors[1].detach()
    T0 = torch.einsum("ab...,ar->rb...", grad, U0)
    T1 = torch.einsum("ab...,br->ar...", grad, U1)
    T01 = torch.einsum("rb...,bs->rs...", T0, U1)
    inputs = [t.to(device) for t in (T0, T1, T01, core.detach())]
    with backends.use(backend):
        got = tucker_projected_backward(*inputs, [f.detach().to(device) for f in factors], 0.7)
    assert len(got) == len(expected)
    for value, want in zip(got, expected):
        torch.testing.assert_close(value.cpu(), want, rtol=1e-10, atol=1e-12)


def test_gradients_come_back_in_each_input_dtype():
    core, factors = torch.randn(2, 3, dtype=torch.bfloat16), [torch.randn(4, 2), torch.randn(5, 3)]
    T0, T1, T01 = torch.randn(2, 5), torch.randn(4, 3), torch.randn(2, 3)
    d_core, d_U0, d_U1 = tucker_projected_backward(T0, T1, T01, core, factors, 1.0)
    assert (d_core.dtype, d_U0.dtype, d_U1.dtype) == (torch.bfloat16, torch.float32, torch.float32)
