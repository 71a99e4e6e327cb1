"""LieRA's and SNELL's ops on each backend that runs here, forward and forward + backward,
against the reference backend (the baseline) and the memory floor: the bytes the op must
move at least (its m×n inputs read and outputs written once, Γ read once in backward) at
the copy bandwidth measured in this run."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends, ops

from .conftest import run

M, N, RANK = 768, 3072, 8


def _hadamard(exp):
    def make(device):
        weight = torch.randn(M, N, device=device)
        B = (torch.randn(M, RANK, device=device) * 0.1).requires_grad_()
        A = (torch.randn(RANK, N, device=device) * 0.1).requires_grad_()
        return lambda: ops.lowrank_hadamard_merge(weight, B, A, 1.0, exp=exp), [B, A], 2

    return make


def _embeddings(device):
    out_emb = (torch.randn(2, M, RANK // 2, device=device) * 0.1).requires_grad_()
    in_emb = (torch.randn(2, N, RANK // 2, device=device) * 0.1).requires_grad_()
    return out_emb, in_emb


def _kernelized(device):
    out_emb, in_emb = _embeddings(device)
    return lambda: ops.kernelized_delta(out_emb, in_emb), [out_emb, in_emb], 1


def _sparsify(device):
    delta = torch.randn(M, N, device=device, requires_grad=True)
    return lambda: ops.sparsify(delta, 0.9), [delta], 2


def _sparse(device):
    out_emb, in_emb = _embeddings(device)
    return lambda: ops.kernelized_sparse_delta(out_emb, in_emb, 0.9), [out_emb, in_emb], 1


# case -> factory(device) giving (the call, its differentiable inputs, m×n passes of its forward)
CASES = {
    "lowrank_hadamard_merge-exact": _hadamard("exact"),
    "lowrank_hadamard_merge-taylor1": _hadamard("taylor1"),
    "kernelized_delta-piecewise": _kernelized,
    "sparsify-hard": _sparsify,
    "kernelized_sparse_delta-piecewise-hard": _sparse,
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("step", ["forward", "forward+backward"])
def test_op(benchmark, floors, device, case, backend, step):
    op_name = case.split("-")[0]
    if backends.why_unavailable(backend, device) is not None or op_name not in backends.implemented_ops(backend):
        pytest.skip(f"{backend} cannot run {op_name} on {device} here")
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter is for correctness, not speed")
    call, inputs, passes = CASES[case](device)
    upstream = torch.randn(M, N, device=device)

    def body():
        out = call()
        if step == "forward+backward":
            torch.autograd.grad(out, inputs, upstream)

    # forward: its m×n passes; backward: Γ read, and m×n inputs or recomputed values read again
    floor_bytes = M * N * 4 * (passes + (passes if step == "forward+backward" else 0))
    benchmark.group = f"{case} {M}x{N} {step} ({device})"
    with backends.use(backend):
        run(benchmark, body, device, floor_s=floor_bytes / floors["copy_bytes_per_s"], baseline=backend == "reference")
