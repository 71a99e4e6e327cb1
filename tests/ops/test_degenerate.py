"""Zero-size and degenerate shapes (issue 15, item 3): every op on every backend that runs
here gives, forward and backward, what its formula gives by torch's own rules for empty
dimensions (an empty result, or an empty sum = 0), checked against ``naive_ops``."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends, ops
from tensor_peft.ops.kernelized_sparse_delta import sparse_linear

from ..conftest import DEVICES
from . import naive_ops

BACKENDS = [(name, device) for device in DEVICES for name in backends.available(device)]


def _randn(*shape, grad=True):
    return torch.randn(shape, dtype=torch.float64).requires_grad_(grad)


def _tucker(shape, ranks, merge=False):
    def make():
        core, factors = _randn(*ranks), [_randn(d, r) for d, r in zip(shape, ranks)]
        if merge:
            return (_randn(*shape, grad=False), core, factors), {"scale": 0.5}
        return (core, factors), {"scale": 1.5}

    return make


def _kernelized(kernel, chunks, m, n, width, **params):
    return lambda: ((_randn(chunks, m, width), _randn(chunks, n, width)), {"kernel": kernel, **params})


def _sparse(kernel, chunks, m, n, width, sparsity, mode):
    def make():
        return (_randn(chunks, m, width), _randn(chunks, n, width), sparsity), {"kernel": kernel, "mode": mode}

    return make


def _hadamard(weight_shape, rank, exp):
    def make():
        cols = torch.Size(weight_shape[1:]).numel()
        return (_randn(*weight_shape, grad=False), _randn(weight_shape[0], rank), _randn(rank, cols), 0.7), {"exp": exp}

    return make


KERNELS = ("piecewise_linear", "rbf", "sigmoid", "linear", "mixture")
CASES = [
    ("tucker-r0-zero", ops.tucker_delta, naive_ops.tucker_delta, _tucker((5, 4), (0, 2))),
    ("tucker-d0-empty", ops.tucker_delta, naive_ops.tucker_delta, _tucker((0, 4), (3, 2))),
    ("tucker-conv-r2-zero", ops.tucker_delta, naive_ops.tucker_delta, _tucker((5, 4, 3), (3, 2, 0))),
    ("tucker-1x1", ops.tucker_delta, naive_ops.tucker_delta, _tucker((1, 1), (1, 1))),
    ("tucker_merge-r1-zero", ops.tucker_merge, naive_ops.tucker_merge, _tucker((5, 4), (2, 0), merge=True)),
    ("tucker_merge-empty", ops.tucker_merge, naive_ops.tucker_merge, _tucker((5, 0, 3), (2, 2, 1), merge=True)),
    ("matrix_exp-no-batch", ops.matrix_exp, naive_ops.matrix_exp, lambda: ((_randn(0, 3, 3),), {})),
    ("matrix_exp-n0", ops.matrix_exp, naive_ops.matrix_exp, lambda: ((_randn(2, 0, 0),), {})),
    ("matrix_exp-1x1", ops.matrix_exp, naive_ops.matrix_exp, lambda: ((_randn(1, 1),), {})),
    ("sparsify-empty", ops.sparsify, naive_ops.sparsify, lambda: ((_randn(3, 0), 0.5), {"mode": "soft"})),
    ("sparsify-one", ops.sparsify, naive_ops.sparsify, lambda: ((_randn(1), 0.5), {"mode": "hard"})),
    *[(f"{kernel}-{label}", ops.kernelized_delta, naive_ops.kernelized_delta, _kernelized(kernel, *shape))
      for kernel in KERNELS
      for label, shape in [("m0", (2, 0, 4, 3)), ("n0", (2, 5, 0, 3)), ("H0", (0, 5, 4, 3)), ("p0", (2, 5, 4, 0)),
                           ("1x1", (1, 1, 1, 1))]],
    ("sparse-m0", ops.kernelized_sparse_delta, naive_ops.kernelized_sparse_delta,
     _sparse("mixture", 2, 0, 4, 3, 0.5, "hard")),
    ("sparse-n0", ops.kernelized_sparse_delta, naive_ops.kernelized_sparse_delta,
     _sparse("piecewise_linear", 2, 5, 0, 3, 0.5, "soft")),
    ("sparse-p0", ops.kernelized_sparse_delta, naive_ops.kernelized_sparse_delta,
     _sparse("rbf", 2, 5, 4, 0, 0.5, "soft")),
    ("hadamard-rank0", ops.lowrank_hadamard_merge, naive_ops.lowrank_hadamard_merge, _hadamard((5, 4), 0, "exact")),
    ("hadamard-rows0", ops.lowrank_hadamard_merge, naive_ops.lowrank_hadamard_merge, _hadamard((0, 4), 2, "exact")),
    ("hadamard-cols0", ops.lowrank_hadamard_merge, naive_ops.lowrank_hadamard_merge,
     _hadamard((5, 0, 3), 2, "taylor1")),
    ("hadamard-1x1", ops.lowrank_hadamard_merge, naive_ops.lowrank_hadamard_merge, _hadamard((1, 1), 1, "exact")),
]  # fmt: skip


def _grad_inputs(args, kwargs):
    flat = [t for a in [*args, *kwargs.values()] for t in (a if isinstance(a, list) else [a])]
    return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]


def _output_and_grads(function, args, kwargs):
    out = function(*args, **kwargs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    inputs = _grad_inputs(args, kwargs)
    return out, torch.autograd.grad(out, inputs, upstream, allow_unused=True)


@pytest.mark.parametrize("label,op,naive,make", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_degenerate_shapes_follow_the_formula(label, op, naive, make, backend, device):
    torch.manual_seed(0)
    args, kwargs = make()
    expected, expected_grads = _output_and_grads(naive, args, kwargs)
    with backends.use(backend):
        got, grads = _output_and_grads(op, args, kwargs)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    for grad, expected_grad, tensor in zip(grads, expected_grads, _grad_inputs(args, kwargs)):
        expected_grad = torch.zeros_like(tensor) if expected_grad is None else expected_grad
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("rows,cols", [(0, 4), (5, 0)])
def test_sparse_linear_with_an_empty_delta_is_the_plain_linear(backend, device, rows, cols):
    out_emb, in_emb = _randn(2, rows, 3), _randn(2, cols, 3)
    weight, bias = _randn(rows, cols, grad=False), _randn(rows)
    x = _randn(6, cols)
    with backends.use(backend):
        y = sparse_linear(x, weight, bias, out_emb, in_emb, 0.5)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, weight, bias))
    grads = torch.autograd.grad(y.sum(), [x, bias, out_emb, in_emb])
    torch.testing.assert_close(grads[0], torch.ones(6, rows, dtype=torch.float64) @ weight)
    torch.testing.assert_close(grads[1], torch.full((rows,), 6.0, dtype=torch.float64))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[2:])
