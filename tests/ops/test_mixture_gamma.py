"""Mixture's temperature gamma (issue 15, item 10): 0 or less raises ValueError naming it
(0 gave all-NaN, a negative one was accepted), and a small gamma stays accurate in float32
on every backend: no further from the exact result (float64 on the same inputs) than twice
the reference's own float32 error."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends, ops

from ..conftest import DEVICES

BACKENDS = [(name, device) for device in DEVICES for name in backends.available(device)]
emb_out, emb_in = torch.randn(2, 5, 3), torch.randn(2, 4, 3)


@pytest.mark.parametrize("gamma", [0.0, -1.0, torch.tensor(0.0), torch.tensor(-0.5, requires_grad=True), -1e-30])
def test_gamma_not_positive_raises_naming_it(gamma):
    with pytest.raises(ValueError, match="gamma must be positive"):
        ops.kernelized_delta(emb_out, emb_in, "mixture", gamma=gamma)
    with pytest.raises(ValueError, match="gamma must be positive"):
        ops.kernelized_sparse_delta(emb_out, emb_in, 0.5, "mixture", gamma=gamma)


def test_other_kernels_take_any_gamma():
    """gamma is an offset for rbf and sigmoid: any finite value is fine there."""
    expected = ops.kernelized_delta(emb_out, emb_in, "rbf", gamma=0.0) - 1.0
    torch.testing.assert_close(ops.kernelized_delta(emb_out, emb_in, "rbf", gamma=-1.0), expected)


@pytest.mark.parametrize("gamma", [1e-3, 1e-5, 1e-7])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_small_gamma_is_accurate_in_float32(gamma, backend, device):
    g = torch.Generator().manual_seed(0)
    out_emb, in_emb = torch.randn(2, 5, 3, generator=g).to(device), torch.randn(2, 4, 3, generator=g).to(device)
    with backends.use("reference"):
        exact = ops.kernelized_delta(out_emb.double(), in_emb.double(), "mixture", gamma=gamma)
        reference = ops.kernelized_delta(out_emb, in_emb, "mixture", gamma=gamma)
    with backends.use(backend):
        got = ops.kernelized_delta(out_emb, in_emb, "mixture", gamma=gamma)
    error = (got.double() - exact).abs().max().item()
    reference_error = (reference.double() - exact).abs().max().item()
    assert error <= 2 * reference_error + 1e-6, (error, reference_error)
