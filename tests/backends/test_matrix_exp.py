"""``matrix_exp`` on every backend that runs here, against SciPy (and closed forms where
SciPy itself is off: the Jordan-like ill-conditioned case): float64 relative error
≤ 1e-13 for ‖A‖₁ ≤ 5 and ≤ 1e-11 up to ‖A‖₁ = 100 (random, nilpotent, rotation
generators, diagonal, ill-conditioned), float32 ≤ 1e-5 for ‖A‖₁ ≤ 5, each matrix of a
batch on its own; the backward against SciPy's Fréchet derivative; non-finite input
gives NaN and a huge norm returns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tensor_peft import backends, ops

from ..conftest import backends_with
from .test_reference import _frechet_adjoint_scipy, scipy_expm

F64 = torch.float64
BACKENDS = backends_with("matrix_exp")
backend_param = pytest.mark.parametrize("backend,device", BACKENDS, ids=[f"{b}-{d}" for b, d in BACKENDS])


def with_norm(A: torch.Tensor, norm: float) -> torch.Tensor:
    """A scaled to the given 1-norm."""
    return A * (norm / torch.linalg.matrix_norm(A, ord=1).clamp_min(1e-300))[..., None, None]


def cases(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    random = torch.randn(n, n, generator=g, dtype=F64)
    skew = random - random.T
    upper = torch.triu(torch.randn(n, n, generator=g, dtype=F64), diagonal=1)
    return {
        "random": random,
        "nilpotent": upper,
        "rotation-generator": skew,
        "diagonal": torch.diag(torch.randn(n, generator=g, dtype=F64)),
        # non-normal: eigenvalues 1 apart at most, a large off-diagonal coupling
        "ill-conditioned": torch.eye(n, dtype=F64) + torch.diag(torch.full((n - 1,), 30.0, dtype=F64), 1)
        if n > 1 else torch.ones(1, 1, dtype=F64),  # fmt: skip
    }


def oracle(name: str, A: torch.Tensor) -> np.ndarray:
    """exp(A) in float64: closed forms for the diagonal case and for a·I + b·N with N the
    shift (exp = e^a Σ_k (bN)^k/k!, exact entry by entry, where SciPy loses ~1.5e-13);
    SciPy's expm otherwise."""
    n = A.shape[-1]
    if name == "diagonal":
        return np.diag(np.exp(np.diag(A.numpy())))
    if name == "ill-conditioned" and n > 1:
        a, b = A[0, 0].item(), A[0, 1].item()
        exact = np.zeros((n, n))
        for i in range(n):
            for k in range(n - i):
                exact[i, i + k] = math.exp(a) * b**k / math.factorial(k)
        return exact
    return scipy_expm(A)


def relative_error(got: torch.Tensor, expected: np.ndarray) -> np.ndarray:
    """Per matrix: the largest entry error over the largest entry of the exact result."""
    got = got.double().cpu().numpy().reshape(-1, *expected.shape[-2:])
    expected = expected.reshape(got.shape)
    return np.abs(got - expected).max(axis=(1, 2)) / np.abs(expected).max(axis=(1, 2))


SIZES = [1, 2, 3, 8, 16, 17, 33]


@backend_param
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("norm,bound", [(1e-3, 1e-13), (0.9, 1e-13), (5.0, 1e-13), (30.0, 1e-11), (100.0, 1e-11)])
def test_float64_matches_scipy(backend, device, n, norm, bound):
    if n == 1 and norm > 5:
        pytest.skip("a 1×1 exp at norm 100 is e^±100: covered by the diagonal cases")
    named = {name: with_norm(m, norm) for name, m in cases(n, seed=n).items()}
    A = torch.stack(list(named.values()))
    expected = np.stack([oracle(name, m) for name, m in named.items()])
    with backends.use(backend):
        got = ops.matrix_exp(A.to(device))
    errors = relative_error(got, expected)
    assert (errors <= bound).all(), dict(zip(named, errors))


@backend_param
@pytest.mark.parametrize("n", [2, 3, 8, 16, 33])
def test_float32_matches_scipy(backend, device, n):
    named = [(name, with_norm(m, norm).float()) for name, m in cases(n, seed=100 + n).items() for norm in (0.01, 1.0, 5.0)]
    A = torch.stack([m for _, m in named])
    expected = np.stack([oracle(name, m.double()) for name, m in named])
    with backends.use(backend):
        got = ops.matrix_exp(A.to(device))
    assert got.dtype == torch.float32
    assert (relative_error(got, expected) <= 1e-5).all()


@backend_param
def test_each_matrix_of_a_batch_is_exact_on_its_own(backend, device):
    """Norms from 1e-6 to 60 in one batch: each matrix gets its own degree and squarings."""
    g = torch.Generator().manual_seed(7)
    norms = [1e-6, 1e-3, 0.5, 3.0, 60.0]
    A = torch.stack([with_norm(torch.randn(6, 6, generator=g, dtype=F64), s) for s in norms])
    with backends.use(backend):
        got = ops.matrix_exp(A.to(device))
    assert (relative_error(got, scipy_expm(A)) <= [1e-13, 1e-13, 1e-13, 1e-13, 1e-11]).all()


@backend_param
@pytest.mark.parametrize("n", [1, 3, 8, 17])
def test_backward_is_the_adjoint_frechet_derivative(backend, device, n):
    g = torch.Generator().manual_seed(n)
    A = torch.stack([with_norm(torch.randn(n, n, generator=g, dtype=F64), s) for s in (0.1, 2.0, 20.0)])
    G = torch.randn(A.shape, generator=g, dtype=F64) * 1e3
    expected = _frechet_adjoint_scipy(A, G)
    A_device = A.to(device).requires_grad_()
    with backends.use(backend):
        (got,) = torch.autograd.grad(ops.matrix_exp(A_device), A_device, G.to(device))
    assert (relative_error(got, expected) <= [1e-13, 1e-13, 1e-11]).all()


@backend_param
def test_non_finite_input_gives_nan_and_huge_norms_return(backend, device):
    A = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    A[1, 0, 2], A[2, 1, 1] = float("nan"), float("inf")
    A[3] = 1e300 * torch.eye(3, dtype=F64) - 1e300 * torch.ones(3, 3, dtype=F64)
    with backends.use(backend):
        got = ops.matrix_exp(A.to(device)).cpu()
    assert relative_error(got[:1], scipy_expm(A[:1])) <= 1e-13  # its neighbours do not spill over
    assert torch.isnan(got[1]).all() and torch.isnan(got[2]).all()
    assert not torch.isfinite(got[3]).all()  # exp overflows: inf/nan, after a bounded number of squarings


@backend_param
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("n", [3, 8])
def test_a_long_batch_of_mixed_matrices(backend, device, dtype, n):
    """61 matrices of norms 1e-4 … 5 (float32) or 50 (float64), every third a rotation
    generator (whose Padé denominator needs row swaps), and a NaN one: the cpu backend runs
    them 8 or 4 at a time, one per SIMD lane, each thread's share ending in a partial group.
    Each matrix must still be exact on its own, forward and backward, and only the NaN one
    gives NaN."""
    g = torch.Generator().manual_seed(11 * n)
    norms = torch.logspace(-4, math.log10(5.0 if dtype == torch.float32 else 50.0), 61, dtype=F64)
    norms = norms[torch.randperm(61, generator=g)]
    matrices = []
    for k, norm in enumerate(norms.tolist()):
        random = torch.randn(n, n, generator=g, dtype=F64)
        matrices.append(with_norm(random - random.T if k % 3 == 0 else random, norm))
    A = torch.stack(matrices).to(dtype)
    A[29, 0, n - 1] = float("nan")
    G = torch.randn(A.shape, generator=g, dtype=F64).to(dtype)
    finite = torch.arange(61) != 29
    # 1e-12, not 1e-13, for float64 below norm 5: SciPy's own error reaches 5e-13 on one of
    # these (against mpmath); a lane given another's squarings or pivots is off by O(1).
    bounds = 1e-5 if dtype == torch.float32 else np.where(norms[finite].numpy() <= 5, 1e-12, 1e-11)
    A_device = A.clone().to(device).requires_grad_()
    with backends.use(backend):
        got = ops.matrix_exp(A_device)
        (grad,) = torch.autograd.grad(got, A_device, G.to(device))
    got, grad = got.detach().cpu(), grad.cpu()
    assert torch.isnan(got[29]).all() and torch.isnan(grad[29]).all()
    assert (relative_error(got[finite], scipy_expm(A[finite].double())) <= bounds).all()
    expected_grad = _frechet_adjoint_scipy(A[finite].double(), G[finite].double())
    assert (relative_error(grad[finite], expected_grad) <= bounds).all()
