"""The sparsification threshold τ of every backend that runs here is exactly (==) the k-th
smallest |x| of a brute-force sort, ties included, and the kept set is exactly |x| > τ:
heavy ties, k = 0, 1 and numel, signed zeros, subnormals, float32 and float64, and a
matrix above 2^24 entries (where torch.quantile stops)."""

from __future__ import annotations

import pytest
import torch

from tensor_peft.backends.kernelized_ops import KernelProblem
from tensor_peft.backends.registry import kernel

from ..conftest import backends_with

BACKENDS = backends_with("sparsify")
backend_param = pytest.mark.parametrize("backend,device", BACKENDS, ids=[f"{b}-{d}" for b, d in BACKENDS])


def brute_force_tau(x: torch.Tensor, k: int) -> float:
    return -float("inf") if k == 0 else x.abs().flatten().sort().values[k - 1].item()


def inputs(kind: str, dtype, generator) -> torch.Tensor:
    if kind == "random":
        return torch.randn(37, 53, generator=generator, dtype=torch.float64).to(dtype)
    if kind == "ties":  # values from five levels and both signs: every threshold is a tie
        levels = torch.tensor([0.0, 0.25, 0.5, 1.0, 3.0], dtype=dtype)
        signs = torch.randint(0, 2, (41, 29), generator=generator) * 2 - 1
        return levels[torch.randint(0, 5, (41, 29), generator=generator)] * signs.to(dtype)
    tiny = torch.finfo(dtype).tiny  # the smallest normal number: below it, subnormals
    special = torch.tensor([0.0, -0.0, tiny / 4, -tiny / 2, tiny, -tiny, 1.0, -1.0, 1e-30], dtype=dtype)
    noise = torch.randn(54, generator=generator, dtype=torch.float64).to(dtype) * tiny
    return torch.cat([special.repeat(3), noise]).reshape(9, 9)


@backend_param
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "ties", "zeros-and-subnormals"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_threshold_equals_a_brute_force_sort(backend, device, dtype, kind, mode):
    x = inputs(kind, dtype, torch.Generator().manual_seed(5)).to(device)
    sparsify = kernel("sparsify", backend)
    for k in sorted({0, 1, 2, x.numel() // 3, x.numel() // 2, x.numel() - 1, x.numel()}):
        out, tau = sparsify(x, k, mode)
        assert tau.item() == brute_force_tau(x.cpu(), k), (k, tau.item())
        magnitude = x.abs()  # the kept set is exactly |x| > τ, each entry by the sparsification's formula
        factor = magnitude if mode == "hard" else magnitude - max(tau.item(), 0.0)
        assert torch.equal(out, torch.where(magnitude > tau, x * factor, torch.zeros_like(x)))


def test_above_two_to_the_24_entries():
    """float32, 2^24 + 3 entries with ties: kthvalue on the flat array gives the exact answer."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-1000, 1000, (2**24 + 3,), generator=generator).float() / 7
    for name, device in BACKENDS:
        if device != "cpu" or name == "triton":
            continue  # the interpreter is too slow for this size
        for k in (1, 2**23 + 5, 2**24 + 3):
            _, tau = kernel("sparsify", name)(x, k, "hard")
            assert tau.item() == x.abs().kthvalue(k).values.item()


FUSED = backends_with("kernelized_sparse_delta")


def exact_linear_case(dtype, device):
    """Embeddings of small integers for the linear kernel (every product exact, most values
    tied), the kernel's parameters, and ΔW_raw computed here."""
    generator = torch.Generator().manual_seed(8)
    out_emb = torch.randint(-2, 3, (2, 23, 2), generator=generator).to(dtype).to(device)
    in_emb = torch.randint(-2, 3, (2, 37, 2), generator=generator).to(dtype).to(device)
    coeff, params = torch.ones(2, dtype=dtype, device=device), torch.zeros(3, dtype=dtype, device=device)
    raw = out_emb.permute(1, 0, 2).reshape(23, 4) @ in_emb.permute(1, 0, 2).reshape(37, 4).T
    return out_emb, in_emb, coeff, params, raw


def spec_mask(raw: torch.Tensor, tau: float, mode: str) -> torch.Tensor:
    magnitude = raw.abs()
    factor = magnitude if mode == "hard" else magnitude - max(tau, 0.0)
    return torch.where(magnitude > tau, raw * factor, torch.zeros_like(raw))


@pytest.mark.parametrize("backend,device", FUSED, ids=[f"{b}-{d}" for b, d in FUSED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_threshold_equals_a_brute_force_sort(backend, device, dtype):
    """kernelized_sparse_delta's τ, found while κ is computed, against a sort."""
    out_emb, in_emb, coeff, params, raw = exact_linear_case(dtype, device)
    kernelized_sparse_delta = kernel("kernelized_sparse_delta", backend)
    for k in (1, 100, raw.numel() // 2, raw.numel()):
        out, tau = kernelized_sparse_delta(KernelProblem(out_emb, in_emb, "linear", coeff, params, 0.0, "hard"), k)
        assert tau.item() == brute_force_tau(raw.cpu(), k), k
        assert torch.equal(out, spec_mask(raw, tau.item(), "hard"))


@pytest.mark.parametrize("backend,device", FUSED, ids=[f"{b}-{d}" for b, d in FUSED])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_fused_mask_by_a_given_threshold(backend, device, mode):
    """Given τ, kernelized_sparse_delta masks by it and selects nothing (k is ignored):
    a tied value, a value between two, 0 and −inf give the mask 1[|ΔW| > τ] exactly, and returned
    is the τ given."""
    out_emb, in_emb, coeff, params, raw = exact_linear_case(torch.float32, device)
    kernelized_sparse_delta = kernel("kernelized_sparse_delta", backend)
    for given in (4.0, 2.5, 0.0, -float("inf")):
        tau = torch.tensor(given, device=device)
        problem = KernelProblem(out_emb, in_emb, "linear", coeff, params, 0.0, mode)
        out, returned = kernelized_sparse_delta(problem, 7, tau)
        assert returned.item() == given
        assert torch.equal(out, spec_mask(raw, given, mode)), given
