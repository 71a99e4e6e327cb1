"""The cpu backend gives bitwise identical results at any thread count (issue 15, item 6):
forward and every gradient of each op at 1, 2, 3 and 8 threads (``torch.set_num_threads``,
which the backend passes on to the extension's OpenMP runtime), on shapes that the kernels
cut into several chunks."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends, ops
from tensor_peft.ops.kernelized_sparse_delta import sparse_linear

pytestmark = pytest.mark.skipif(backends.why_unavailable("cpu", "cpu") is not None, reason="no cpu backend here")

THREADS = (1, 2, 3, 8)


def _randn(g, *shape, scale=1.0, grad=True):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).float().requires_grad_(grad)


def _kernelized(kernel, **params):
    def make(g):
        return ops.kernelized_delta, (_randn(g, 2, 512, 2), _randn(g, 2, 128, 2)), {"kernel": kernel, **params}

    return make


CASES = {
    "tucker_delta": lambda g: (ops.tucker_delta, (_randn(g, 16, 8), [_randn(g, 200, 16), _randn(g, 300, 8)]), {}),
    "tucker_merge-conv": lambda g: (
        ops.tucker_merge,
        (_randn(g, 64, 32, 3, 3, grad=False), _randn(g, 8, 8, 2, 2),
         [_randn(g, 64, 8), _randn(g, 32, 8), _randn(g, 3, 2), _randn(g, 3, 2)]),
        {"scale": 0.5},
    ),  # fmt: skip
    "hadamard-exact": lambda g: (
        ops.lowrank_hadamard_merge,
        (_randn(g, 512, 256, grad=False), _randn(g, 512, 8, scale=0.1), _randn(g, 8, 256, scale=0.1), 0.5),
        {"exp": "exact"},
    ),
    "matrix_exp-3x3": lambda g: (ops.matrix_exp, (_randn(g, 100, 3, 3, scale=0.5),), {}),
    "matrix_exp-20x20": lambda g: (ops.matrix_exp, (_randn(g, 12, 20, 20, scale=0.1),), {}),
    **{f"kernelized-{kernel}": _kernelized(kernel) for kernel in ("piecewise_linear", "rbf", "sigmoid", "linear")},
    "kernelized-mixture": _kernelized("mixture", gamma=0.3, alpha=torch.tensor(0.7, requires_grad=True)),
    "sparsify": lambda g: (ops.sparsify, (_randn(g, 300, 200), 0.7), {"mode": "soft"}),
    "sparse-mixture-soft": lambda g: (
        ops.kernelized_sparse_delta, (_randn(g, 2, 512, 2), _randn(g, 2, 128, 2), 0.6), {"kernel": "mixture", "mode": "soft"}
    ),  # fmt: skip
    **{f"sparse_linear-mixture-{s}": (lambda s, tokens: lambda g: (
        sparse_linear,
        (_randn(g, tokens, 128), _randn(g, 512, 128, grad=False), None, _randn(g, 2, 512, 2), _randn(g, 2, 128, 2), s),
        {"kernel": "mixture", "mode": "hard"},
    ))(s, tokens) for s, tokens in ((0.5, 64), (0.97, 1100))},  # the dense and the sampled backward  # fmt: skip
    "sparse_linear-sampled": lambda g: (
        sparse_linear,
        (_randn(g, 1100, 128), _randn(g, 512, 128, grad=False), None, _randn(g, 2, 512, 2), _randn(g, 2, 128, 2), 0.97),
        {"kernel": "rbf", "mode": "hard"},
    ),
}


def _inputs(args, kwargs):
    flat = [t for a in [*args, *kwargs.values()] for t in (a if isinstance(a, list) else [a])]
    return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]


def _run(make, threads: int) -> list[torch.Tensor]:
    op, args, kwargs = make(torch.Generator().manual_seed(0))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with backends.use("cpu"):
            out = op(*args, **kwargs)
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
            grads = torch.autograd.grad(out, _inputs(args, kwargs), upstream)
    finally:
        torch.set_num_threads(previous)
    return [out.detach(), *grads]


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bitwise_identical_at_any_thread_count(case):
    one = _run(CASES[case], THREADS[0])
    for threads in THREADS[1:]:
        other = _run(CASES[case], threads)
        for index, (a, b) in enumerate(zip(one, other)):
            assert torch.equal(a, b), f"{case}: result {index} differs between 1 and {threads} threads"


def test_torch_set_num_threads_sets_the_extensions_threads():
    from tensor_peft import _C

    previous = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            ops.matrix_exp(torch.zeros(1, 2, 2))  # a call passes the count on
            assert _C.max_threads() == threads
    finally:
        torch.set_num_threads(previous)
