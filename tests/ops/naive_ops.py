"""Every op written directly from its formula in plain torch (einsum, broadcasting), with
autograd for the gradients: an oracle independent of the backends, and one that handles
zero-size dimensions by torch's own rules (an empty sum is 0)."""

from __future__ import annotations

import string

import torch

from tensor_peft.ops.kernelized_delta import default_coeff

from ..naive import naive_sparsify


def tucker_delta(core, factors, scale=1.0):
    modes = string.ascii_lowercase[: core.dim()]
    outs = string.ascii_uppercase[: core.dim()]
    spec = ",".join([modes] + [o + m for o, m in zip(outs, modes)]) + "->" + outs
    return scale * torch.einsum(spec, core, *factors)


def tucker_merge(weight, core, factors, scale=1.0):
    return weight + tucker_delta(core, factors, scale)


def matrix_exp(A):
    return torch.linalg.matrix_exp(A)


def lowrank_hadamard_merge(weight, B, A, scale, exp="exact"):
    delta = (scale * B @ A.reshape(B.shape[1], weight.shape[1:].numel())).reshape(weight.shape)
    return weight * (torch.exp(delta) if exp == "exact" else 1 + delta)


def kernelized_delta(out_emb, in_emb, kernel="piecewise_linear", coeff=None, eps=1e-12, alpha=1.0, beta=None,
                     gamma=None):  # fmt: skip
    """ΔW_raw[j, i] = κ(b_j, a_i) from out_emb (H, m, p), in_emb (H, n, p)."""
    beta = {"mixture": 0.0}.get(kernel, 1.0) if beta is None else beta
    gamma = {"mixture": 1.0}.get(kernel, 0.0) if gamma is None else gamma
    if coeff is None:
        coeff = default_coeff(out_emb.shape[0])
    coeff = torch.as_tensor(coeff, dtype=out_emb.dtype) if not isinstance(coeff, torch.Tensor) else coeff
    diff = out_emb[:, :, None, :] - in_emb[:, None, :, :]  # (H, m, n, p)
    if kernel in ("piecewise_linear", "mixture"):
        radii = torch.sqrt((diff * diff).sum(-1) + eps)
        piecewise = (coeff.reshape(-1, 1, 1) * radii).sum(0)
        if kernel == "piecewise_linear":
            return piecewise
        return piecewise + alpha * torch.softmax(piecewise / gamma, dim=0) + beta
    if kernel == "rbf":
        return alpha * torch.exp(-beta * (diff * diff).sum((0, -1))) + gamma
    dots = torch.einsum("hmp,hnp->mn", out_emb, in_emb)
    if kernel == "sigmoid":
        return alpha * torch.sigmoid(beta * dots) + gamma
    return dots


def kernelized_sparse_delta(out_emb, in_emb, sparsity, kernel="piecewise_linear", mode="hard", **params):
    return naive_sparsify(kernelized_delta(out_emb, in_emb, kernel, **params), sparsity, mode)


def sparsify(delta, sparsity, mode="hard"):
    return naive_sparsify(delta, sparsity, mode)
