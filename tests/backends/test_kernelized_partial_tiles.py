"""SNELL's kernelized gradients on shapes that leave partial tiles (m, n not multiples of
the kernels' 32-wide tiles): every backend that runs here matches the reference
backend's autograd on fresh random inputs, the kernel parameters' gradients included
(rows and columns outside the matrix must add nothing)."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends, ops

from ..conftest import backends_with

BACKENDS = [pair for pair in backends_with("kernelized_sparse_delta_backward") if pair[0] != "reference"]


def gradients(backend: str, device: str, seed: int, kernel: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out_emb = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)
    in_emb = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64)
    params = {
        "coeff": torch.randn(2, generator=generator, dtype=torch.float64),
        "alpha": torch.rand((), generator=generator, dtype=torch.float64) + 0.5,
        "beta": torch.rand((), generator=generator, dtype=torch.float64) + 0.5,
        "gamma": torch.rand((), generator=generator, dtype=torch.float64) + 0.5,
    }
    accepted = {"mixture": ("coeff", "alpha", "beta", "gamma"), "piecewise_linear": ("coeff",)}
    params = {name: value for name, value in params.items() if name in accepted.get(kernel, ("alpha", "beta", "gamma"))}
    weights = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    leaves = [out_emb, in_emb, *params.values()]
    leaves = [leaf.to(device).requires_grad_() for leaf in leaves]
    named = dict(zip(params, leaves[2:]))
    with backends.use(backend):  # the backward runs on the backend chosen when it runs
        delta = ops.kernelized_delta(leaves[0], leaves[1], kernel, **named)
        return torch.autograd.grad((delta * weights.to(device)).sum(), leaves)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=[f"{b}-{d}" for b, d in BACKENDS])
@pytest.mark.parametrize("kernel", ["mixture", "rbf", "sigmoid", "piecewise_linear"])
def test_gradients_match_the_reference_on_partial_tiles(backend, device, kernel):
    expected = gradients("reference", "cpu", 3, kernel)
    got = gradients(backend, device, 3, kernel)
    for index, (e, g) in enumerate(zip(expected, got)):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-9, atol=1e-9, msg=f"gradient {index}")
