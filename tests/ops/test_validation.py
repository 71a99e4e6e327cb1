"""Bad input to the public ops raises ValueError/TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import ops
from tensor_peft.ops.kernelized_sparse_delta import sparse_delta_and_threshold, sparse_linear

f32 = dict(dtype=torch.float32)
core, U0, U1 = torch.randn(3, 2), torch.randn(5, 3), torch.randn(7, 2)
emb_out, emb_in = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
W, B, A = torch.randn(6, 4), torch.randn(6, 2), torch.randn(2, 4)

BAD_CALLS = [
    # tucker_delta / tucker_merge
    (lambda: ops.tucker_delta(core.numpy(), [U0, U1]), TypeError, "core must be a torch.Tensor"),
    (lambda: ops.tucker_delta(core.int(), [U0, U1]), TypeError, "core must be float16"),
    (lambda: ops.tucker_delta(torch.randn(3), [U0]), ValueError, "core must have at least 2"),
    (lambda: ops.tucker_delta(core, U0), TypeError, "factors must be a list"),
    (lambda: ops.tucker_delta(core, [U0]), ValueError, "factors must hold one matrix per mode"),
    (lambda: ops.tucker_delta(core, [U0, U0]), ValueError, r"factors\[1\] must have shape"),
    (lambda: ops.tucker_delta(core, [U0, U1.unsqueeze(0)]), ValueError, r"factors\[1\] must have 2"),
    (lambda: ops.tucker_delta(core, [U0, U1], scale="1"), TypeError, "scale must be a real number"),
    (lambda: ops.tucker_delta(core, [U0, U1], scale=float("nan")), ValueError, "scale must be finite"),
    (lambda: ops.tucker_delta(core, [U0, U1.to("meta")]), ValueError, r"factors\[1\] is on meta but core is on cpu"),
    (lambda: ops.tucker_merge(torch.randn(5, 6), core, [U0, U1]), ValueError, "weight must have the shape"),
    (lambda: ops.tucker_merge(torch.randn(5, 7, requires_grad=True), core, [U0, U1]), ValueError,
     "weight requires grad"),
    # matrix_exp
    (lambda: ops.matrix_exp(torch.randn(3)), ValueError, "A must have at least 2"),
    (lambda: ops.matrix_exp(torch.randn(2, 3, 4)), ValueError, "A must hold square matrices"),
    (lambda: ops.matrix_exp(torch.randn(3, 3, dtype=torch.complex64)), TypeError, "A must be float16"),
    # kernelized_delta / kernelized_sparse_delta / sparsify
    (lambda: ops.kernelized_delta(emb_out[0], emb_in), ValueError, "out_emb must have 3"),
    (lambda: ops.kernelized_delta(emb_out, emb_in[:, :, :2]), ValueError, "in_emb must have shape"),
    (lambda: ops.kernelized_delta(emb_out, emb_in, kernel="cosine"), ValueError, "kernel must be one of"),
    (lambda: ops.kernelized_delta(emb_out, emb_in, kernel="linear", alpha=1.0), TypeError,
     "kernel 'linear' takes the parameters"),
    (lambda: ops.kernelized_delta(emb_out, emb_in, coeff=[0.1]), ValueError, "coeff must hold one"),
    (lambda: ops.kernelized_delta(emb_out, emb_in, coeff=torch.ones(3)), ValueError, "coeff must have 2"),
    (lambda: ops.kernelized_delta(emb_out, emb_in, kernel="rbf", beta=torch.ones(2)), ValueError,
     "beta must have 1"),
    (lambda: ops.kernelized_delta(emb_out, emb_in, eps=-1.0), ValueError, "eps must be non-negative"),
    (lambda: ops.sparsify(W, 1.5), ValueError, r"sparsity must be in \[0, 1\]"),
    (lambda: ops.sparsify(W, 0.5, mode="medium"), ValueError, "mode must be one of"),
    (lambda: ops.sparsify(W, 0.5, threshold="median"), ValueError, "threshold must be one of"),
    (lambda: ops.sparsify(W, torch.tensor([0.5])), ValueError, "sparsity as a tensor must be a 0-dim"),
    (lambda: ops.sparsify(W, torch.tensor(1.5)), ValueError, r"sparsity must be in \[0, 1\]"),
    (lambda: ops.kernelized_sparse_delta(emb_out, emb_in, -0.1), ValueError, "sparsity must be in"),
    (lambda: ops.kernelized_sparse_delta(emb_out, emb_in, 0.5, mode="x"), ValueError, "mode must be"),
    (lambda: sparse_delta_and_threshold(emb_out, emb_in, 0.5, tau=torch.ones(1)), ValueError,
     "tau must have 0 dimensions"),
    (lambda: sparse_linear(torch.randn(3, emb_in.shape[1]), torch.randn(emb_out.shape[1], emb_in.shape[1],
                                                                      requires_grad=True), None, emb_out, emb_in, 0.5),
     ValueError, "weight requires grad"),
    (lambda: sparse_linear(torch.randn(3, 2), torch.randn(emb_out.shape[1], emb_in.shape[1]), None, emb_out, emb_in,
                           0.5), ValueError, "input's last dimension must be"),
    (lambda: sparse_linear(torch.randn(3, 2), None, None, emb_out, emb_in, 0.5), ValueError,
     "input's last dimension must be"),
    (lambda: sparse_linear(torch.randn(3, emb_in.shape[1]), torch.randn(emb_out.shape[1], 2), None, emb_out, emb_in,
                           0.5), ValueError, "weight must have the shape"),
    (lambda: sparse_delta_and_threshold(emb_out, emb_in, 0.5, tau=torch.tensor(1.0, device="meta")),
     ValueError, "tau is on meta"),
    # lowrank_hadamard_merge
    (lambda: ops.lowrank_hadamard_merge(W, B[:5], A, 1.0), ValueError, "B must have shape"),
    (lambda: ops.lowrank_hadamard_merge(W, B, A[:, :3], 1.0), ValueError, "A must have shape"),
    (lambda: ops.lowrank_hadamard_merge(W, B, A, 1.0, exp="pade"), ValueError, "exp must be one of"),
    (lambda: ops.lowrank_hadamard_merge(W, B, A, None), TypeError, "scale must be a real number"),
    (lambda: ops.lowrank_hadamard_merge(W.requires_grad_(False).clone().requires_grad_(), B, A, 1.0),
     ValueError, "weight requires grad"),
]  # fmt: skip


@pytest.mark.parametrize("call,error,message", BAD_CALLS, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_frozen_weight_check_is_off_under_no_grad():
    """Under no_grad nothing is differentiated, so a weight that requires grad is fine."""
    weight = torch.randn(6, 4, requires_grad=True)
    with torch.no_grad():
        merged = ops.lowrank_hadamard_merge(weight, B, A, 0.5, exp="taylor1")
    torch.testing.assert_close(merged, weight * (1 + 0.5 * B @ A))


def test_meta_tensors_give_shapes_without_computing():
    meta = lambda t: t.to("meta")  # noqa: E731
    delta = ops.tucker_delta(meta(core), [meta(U0), meta(U1)])
    assert delta.device.type == "meta" and delta.shape == (5, 7)
    merged = ops.lowrank_hadamard_merge(meta(torch.randn(6, 2, 2)), meta(B), meta(A.reshape(2, 2, 2)), 1.0)
    assert merged.shape == (6, 2, 2)


def test_matrix_exp_of_non_finite_input_is_nan_not_an_error_or_hang():
    A = torch.randn(3, 4, 4)
    A[1, 2, 0] = float("inf")
    A[2, 0, 0] = float("nan")
    out = ops.matrix_exp(A)
    assert torch.isnan(out[1:]).all()
    torch.testing.assert_close(out[0], torch.linalg.matrix_exp(A[0]))


@pytest.mark.parametrize("call,message", [
    (lambda o, i: ops.kernelized_delta(o, i, "rbf", alpha=torch.tensor(1.0, device="meta"), beta=1.0, gamma=0.0),
     "alpha is on meta but out_emb is on cpu"),
    (lambda o, i: ops.tucker_delta(torch.randn(2, 2), [torch.randn(3, 2), torch.randn(3, 2)], 10**400),
     "scale must be finite, got an integer too large"),
    (lambda o, i: sparse_linear(torch.randn(3, 4), torch.randn(5, 4), torch.randn(4), o, i, 0.5),
     r"bias must have shape \(5,\)"),
])
def test_argument_errors_name_the_argument(call, message):
    out_emb, in_emb = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=message):
        call(out_emb, in_emb)
