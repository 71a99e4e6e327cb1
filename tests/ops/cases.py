"""Random inputs for every public op, in the op's public calling form, shared by the
op tests. Sizes are small and odd (not multiples of any block size)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tensor_peft import ops


@dataclass(frozen=True)
class Case:
    """One op call: ``make(dtype, device, generator)`` returns (args, kwargs) whose
    differentiable tensors require grad. ``smooth``: the op is differentiable in the
    ordinary sense (its gradient is the true derivative), so gradcheck applies."""

    id: str
    op: Callable
    make: Callable
    smooth: bool = True


def _randn(generator, dtype, device, *shape, scale=1.0, grad=True):
    tensor = torch.randn(shape, generator=generator, dtype=torch.float64) * scale
    return tensor.to(dtype=dtype, device=device).requires_grad_(grad)


def _tucker(shape, ranks, merge=False):
    def make(dtype, device, g):
        core = _randn(g, dtype, device, *ranks)
        factors = [_randn(g, dtype, device, d, r, scale=0.7) for d, r in zip(shape, ranks)]
        if merge:
            return (_randn(g, dtype, device, *shape, grad=False), core, factors), {"scale": 0.8}
        return (core, factors), {"scale": 1.3}

    return make


def _matrix_exp(shape):
    def make(dtype, device, g):
        n = shape[-1]
        return (_randn(g, dtype, device, *shape, scale=1.5 / n),), {}

    return make


def _kernelized(kernel, chunks, m, n, width, **params):
    def make(dtype, device, g):
        out_emb = _randn(g, dtype, device, chunks, m, width, scale=0.6)
        in_emb = _randn(g, dtype, device, chunks, n, width, scale=0.6)
        kernel_params = {
            key: (_randn(g, dtype, device, *value) if isinstance(value, tuple) else value)
            for key, value in params.items()
        }
        return (out_emb, in_emb), {"kernel": kernel, **kernel_params}

    return make


def _sparse(kernel, mode, sparsity):
    kernelized = _kernelized(kernel, 2, 7, 6, 3)

    def make(dtype, device, g):
        args, kwargs = kernelized(dtype, device, g)
        return (*args, sparsity), {**kwargs, "mode": mode}

    return make


def _sparsify(shape, mode, sparsity):
    def make(dtype, device, g):
        return (_randn(g, dtype, device, *shape), sparsity), {"mode": mode}

    return make


def _hadamard(weight_shape, rank, exp, conv_a):
    def make(dtype, device, g):
        weight = _randn(g, dtype, device, *weight_shape, grad=False)
        B = _randn(g, dtype, device, weight_shape[0], rank, scale=0.5)
        a_shape = (rank, *weight_shape[1:]) if conv_a else (rank, weight.numel() // weight_shape[0])
        A = _randn(g, dtype, device, *a_shape, scale=0.5)
        return (weight, B, A, 0.7), {"exp": exp}

    return make


CASES = [
    Case("tucker_delta-linear", ops.tucker_delta, _tucker((5, 7), (3, 2))),
    Case("tucker_delta-conv2d", ops.tucker_delta, _tucker((6, 5, 3, 3), (3, 2, 2, 2))),
    Case("tucker_delta-conv3d", ops.tucker_delta, _tucker((4, 3, 3, 1, 2), (2, 3, 2, 1, 2))),
    Case("tucker_merge-conv1d", ops.tucker_merge, _tucker((5, 3, 3), (2, 3, 2), merge=True)),
    Case("matrix_exp-batch", ops.matrix_exp, _matrix_exp((4, 3, 3))),
    Case("matrix_exp-single", ops.matrix_exp, _matrix_exp((1, 5, 5))),
    Case("matrix_exp-2dbatch", ops.matrix_exp, _matrix_exp((2, 3, 7, 7))),
    Case("kernelized-piecewise", ops.kernelized_delta, _kernelized("piecewise_linear", 2, 7, 5, 3)),
    Case("kernelized-piecewise-coeff", ops.kernelized_delta,
         _kernelized("piecewise_linear", 3, 4, 6, 2, coeff=(3,), eps=1e-6)),
    Case("kernelized-rbf", ops.kernelized_delta,
         _kernelized("rbf", 2, 5, 6, 2, alpha=(), beta=(), gamma=())),
    Case("kernelized-sigmoid", ops.kernelized_delta,
         _kernelized("sigmoid", 2, 5, 4, 3, alpha=(), beta=(), gamma=0.3)),
    Case("kernelized-linear", ops.kernelized_delta, _kernelized("linear", 1, 6, 5, 4)),
    Case("kernelized-mixture", ops.kernelized_delta,
         _kernelized("mixture", 2, 5, 7, 2, coeff=(2,), alpha=(), beta=(), gamma=1.5)),
    Case("sparsify-hard", ops.sparsify, _sparsify((9, 7), "hard", 0.6), smooth=False),
    Case("sparsify-soft", ops.sparsify, _sparsify((5, 3, 3), "soft", 0.3), smooth=False),
    Case("sparsify-keep-all", ops.sparsify, _sparsify((4, 5), "soft", 0.0), smooth=False),
    Case("sparse-piecewise-hard", ops.kernelized_sparse_delta,
         _sparse("piecewise_linear", "hard", 0.5), smooth=False),
    Case("sparse-mixture-soft", ops.kernelized_sparse_delta,
         _sparse("mixture", "soft", 0.8), smooth=False),
    Case("hadamard-linear-exact", ops.lowrank_hadamard_merge, _hadamard((7, 5), 3, "exact", False)),
    Case("hadamard-conv-exact", ops.lowrank_hadamard_merge, _hadamard((6, 2, 3, 3), 2, "exact", True)),
    Case("hadamard-conv-taylor1", ops.lowrank_hadamard_merge,
         _hadamard((5, 4, 1, 3), 2, "taylor1", False)),
]  # fmt: skip

# Sizes past one kernel block in every dimension (rows, columns, rank): compared with
# the reference only, too big for gradcheck.
BLOCK_CASES = [
    Case("tucker_merge-conv2d-blocks", ops.tucker_merge, _tucker((37, 70, 3, 3), (20, 5, 2, 2), merge=True)),
    Case("tucker_delta-linear-blocks", ops.tucker_delta, _tucker((67, 130), (18, 7))),
]
