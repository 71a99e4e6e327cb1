"""``ops.hadamard_linear``: LieRA's linear layer as one autograd node, against plain torch
(W0 ⊙ exp(s·B·A) formed whole, ``F.linear``, autograd)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from tensor_peft import backends, ops

from ..conftest import backends_with
from . import naive_ops

hadamard_module = importlib.import_module("tensor_peft.ops.lowrank_hadamard_merge")
MERGE_BACKENDS = backends_with("lowrank_hadamard_merge_backward")


def rows_per_block(monkeypatch, rows: int | None) -> None:
    """Make ``hadamard_linear`` run over blocks of ``rows`` rows (None: its own count)."""
    if rows is not None:
        monkeypatch.setattr(hadamard_module, "ROW_BLOCK", rows)


@pytest.mark.parametrize("backend,device", MERGE_BACKENDS, ids=[f"{b}-{d}" for b, d in MERGE_BACKENDS])
@pytest.mark.parametrize("exp", ["exact", "taylor1"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("block", [None, 1, 7, 16], ids=["two-blocks-of-20", "1-row", "7-rows", "16-rows"])
def test_hadamard_linear_equals_linear_of_the_merged_weight(backend, device, exp, with_bias, block, monkeypatch):
    """Forward and the gradients of input, B, A and a trained bias, on a 3-d input, over
    blocks of rows that do not divide the 40 rows, and the default's two blocks of 20."""
    rows_per_block(monkeypatch, block)
    generator = torch.Generator().manual_seed(21 + (block or 0))

    def randn(*shape, grad=True):
        tensor = torch.randn(*shape, generator=generator, dtype=torch.float64).to(device)
        return tensor.requires_grad_(grad)

    x, weight, B, A = randn(2, 5, 30), randn(40, 30, grad=False), randn(40, 3), randn(3, 30)
    bias = randn(40) if with_bias else None
    inputs = [x, B, A] + ([bias] if with_bias else [])
    upstream = torch.randn(2, 5, 40, generator=generator, dtype=torch.float64).to(device)
    with backends.use(backend):
        got = ops.hadamard_linear(x, weight, bias, B, A, 0.3, exp)
        got_grads = torch.autograd.grad(got, inputs, upstream)
    expected = F.linear(x, naive_ops.lowrank_hadamard_merge(weight, B, A, 0.3, exp), bias)
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for got_t, want in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_t, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [None, 5], ids=["one-block", "5-rows"])
def test_hadamard_linear_rounds_the_merged_weight_once_to_the_input_dtype(input_dtype, block, monkeypatch):
    """A bfloat16 base: W_eff is computed in float32 and rounded once, to the input's dtype
    (so a float32 input multiplies the unrounded W_eff), as the layer's other paths do; the
    input's gradient is g·W_eff (rounded so) summed over the blocks and rounded once."""
    rows_per_block(monkeypatch, block)
    generator = torch.Generator().manual_seed(22 + (block or 0))
    weight = torch.randn(16, 12, generator=generator).to(torch.bfloat16)
    B, A = torch.randn(16, 2, generator=generator), torch.randn(2, 12, generator=generator)
    x = torch.randn(3, 12, generator=generator).to(input_dtype).requires_grad_()
    upstream = torch.randn(3, 16, generator=generator).to(input_dtype)
    merged = naive_ops.lowrank_hadamard_merge(weight.double(), B.double(), A.double(), 0.5).to(input_dtype)
    got = ops.hadamard_linear(x, weight, None, B, A, 0.5)
    torch.testing.assert_close(got, F.linear(x, merged))
    (grad_input,) = torch.autograd.grad(got, x, upstream)
    expected = (upstream.double() @ merged.double()).to(input_dtype)
    torch.testing.assert_close(grad_input, expected)


def test_hadamard_linear_under_autocast_gives_autocast_dtypes_and_the_whole_weight_values(monkeypatch):
    """A float32 input under bfloat16 autocast: the output in bfloat16 (F.linear's under
    autocast), the input's gradient from a bfloat16 output gradient, both as F.linear of
    the whole W_eff (formed in float32) computes them there, over 3 blocks of rows."""
    rows_per_block(monkeypatch, 4)
    generator = torch.Generator().manual_seed(23)
    weight = torch.randn(10, 8, generator=generator) / 4  # outputs and gradients of about 1: bfloat16 steps of 1/128
    B, A = torch.randn(10, 2, generator=generator), torch.randn(2, 8, generator=generator)
    B.requires_grad_()
    x = torch.randn(6, 8, generator=generator, requires_grad=True)
    results = []
    for run in ("op", "plain"):
        merged = naive_ops.lowrank_hadamard_merge(weight, B, A, 0.5)  # in float32, outside autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ops.hadamard_linear(x, weight, None, B, A, 0.5) if run == "op" else F.linear(x, merged)
        results.append((out, *torch.autograd.grad(out.float().square().sum(), (x, B))))
    (got, got_x, got_B), (want, want_x, want_B) = results
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_x, want_x, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_B, want_B, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda W, B, A, x: ops.hadamard_linear(x[:, :5], W, None, B, A, 1.0), ValueError, "input's last dimension"),
        (lambda W, B, A, x: ops.hadamard_linear(x, W, None, B[:3], A, 1.0), ValueError, "must match weight"),
        (lambda W, B, A, x: ops.hadamard_linear(x, W, torch.zeros(3), B, A, 1.0), ValueError, "bias must have shape"),
        (lambda W, B, A, x: ops.hadamard_linear(x, W, None, B, A, 1.0, "pade"), ValueError, "exp must be one of"),
        (lambda W, B, A, x: ops.hadamard_linear(x, W.requires_grad_(), None, B, A, 1.0), ValueError, "requires grad"),
    ],
)
def test_hadamard_linear_refuses_bad_arguments(call, error, match):
    W, B, A, x = torch.randn(8, 6), torch.randn(8, 2), torch.randn(2, 6), torch.randn(4, 6)
    with pytest.raises(error, match=match):
        call(W, B, A, x)


@pytest.mark.parametrize("rows, columns", [(0, 6), (1, 6), (3, 0)])
def test_hadamard_linear_on_degenerate_weights_equals_plain_torch(rows, columns):
    """No rows (one empty block), one row (a block of it), no columns: the shapes and values
    plain torch gives, gradients included."""
    generator = torch.Generator().manual_seed(24)
    weight = torch.randn(rows, columns, generator=generator, dtype=torch.float64)
    B = torch.randn(rows, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, columns, generator=generator, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, columns, generator=generator, dtype=torch.float64, requires_grad=True)
    got = ops.hadamard_linear(x, weight, None, B, A, 0.5)
    expected = F.linear(x, naive_ops.lowrank_hadamard_merge(weight, B, A, 0.5))
    assert got.shape == expected.shape == (4, rows)
    torch.testing.assert_close(got, expected)
    upstream = torch.randn(4, rows, generator=generator, dtype=torch.float64)
    for got_grad, want in zip(torch.autograd.grad(got, (x, B, A), upstream), torch.autograd.grad(expected, (x, B, A), upstream)):
        torch.testing.assert_close(got_grad, want)
