"""The backward of the fused sparsification rebuilds exactly the forward's mask: ΔW_raw is
recomputed from the embeddings, and an entry dropped at τ (|ΔW| = τ) must stay dropped,
so the recomputation has to give the forward's bits. Found by tests/test_properties.py."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends, ops

from ..conftest import DEVICES

BACKENDS = [(name, device) for device in DEVICES for name in backends.available(device)]
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_entry_dropped_at_tau_gets_no_gradient(backend, device):
    out_emb = torch.tensor([[[0.05325245528439667]]], dtype=torch.float64, device=device, requires_grad=True)
    in_emb = torch.tensor([[[0.92459766494642592], [-0.17605734345656782]]], dtype=torch.float64, device=device,
                          requires_grad=True)  # fmt: skip
    with backends.use(backend):
        delta = ops.kernelized_sparse_delta(out_emb, in_emb, 0.5, "mixture", "hard", alpha=2.0, beta=-1.0)
        delta.backward(torch.tensor([[1.5, -0.7]], dtype=torch.float64, device=device))
    assert delta[0, 1] == 0  # the smaller magnitude is dropped (k = 1)
    assert in_emb.grad[0, 1, 0] == 0  # so nothing flows to its column's embedding
