"""The triton backend's ``matrix_exp`` on both of its paths: the Triton kernel (n ≤ 32) and
torch's ``matrix_exp`` with the block form of the Fréchet derivative (32 < n ≤ 128),
forward and backward against SciPy on fresh random matrices, non-finite matrices NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tensor_peft import backends, ops

from ..conftest import backends_with
from .test_reference import _frechet_adjoint_scipy, scipy_expm

pytestmark = pytest.mark.skipif(("triton", "cpu") not in backends_with("matrix_exp"), reason="triton does not run")


@pytest.mark.parametrize("n", [32, 33, 40])
def test_forward_and_backward_match_scipy(n):
    g = torch.Generator().manual_seed(n)
    A = torch.randn(2, n, n, generator=g, dtype=torch.float64) * (3.0 / n)
    A[1] *= 10
    G = torch.randn(A.shape, generator=g, dtype=torch.float64)
    leaf = A.clone().requires_grad_()
    with backends.use("triton"):
        out = ops.matrix_exp(leaf)
        (grad,) = torch.autograd.grad(out, leaf, G)
    expected = scipy_expm(A)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-11, atol=1e-11 * np.abs(expected).max())
    frechet = _frechet_adjoint_scipy(A, G)
    np.testing.assert_allclose(grad.numpy(), frechet, rtol=1e-10, atol=1e-10 * np.abs(frechet).max())


def test_non_finite_matrices_give_nan_on_the_torch_path():
    A = torch.randn(3, 40, 40, dtype=torch.float64)
    A[1, 2, 3] = float("inf")
    with backends.use("triton"):
        out = ops.matrix_exp(A)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
