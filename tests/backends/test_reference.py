"""The reference backend against independent formulations: one einsum for the Tucker
update, SciPy's expm / expm_frechet and finite differences for the matrix exponential,
torch.cdist-based kernels, a full sort for the sparsity threshold, and autograd through
those naive versions for every explicit backward formula."""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
import scipy.linalg
import torch

from tensor_peft.backends import reference as ref

from ..naive import naive_sparsify

F64 = dict(rtol=1e-10, atol=1e-12)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale=1.0, dtype=torch.float64):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


# --------------------------------------------------------------------------- Tucker


def einsum_tucker(core, factors, scale):
    letters = string.ascii_letters
    ranks, dims = letters[: core.dim()], letters[core.dim() : 2 * core.dim()]
    spec = ",".join([ranks] + [d + r for d, r in zip(dims, ranks)]) + "->" + dims
    return scale * torch.einsum(spec, core, *factors)


TUCKER_SHAPES = [
    ((5, 7), (3, 2)),
    ((1, 4), (1, 3)),
    ((6, 5, 3), (2, 3, 2)),
    ((6, 5, 3, 3), (3, 2, 2, 2)),
    ((4, 3, 3, 1, 2), (2, 3, 2, 1, 2)),
]


@pytest.mark.parametrize("dims,ranks", TUCKER_SHAPES)
def test_tucker_forward_and_backward_match_einsum(dims, ranks):
    g = _gen(0)
    core = _randn(g, *ranks).requires_grad_()
    factors = [_randn(g, d, r).requires_grad_() for d, r in zip(dims, ranks)]
    weight = _randn(g, *dims)
    upstream = _randn(g, *dims)
    expected = einsum_tucker(core, factors, 0.6)
    torch.testing.assert_close(ref.tucker_delta(core.detach(), [f.detach() for f in factors], 0.6), expected.detach(), **F64)
    merged = ref.tucker_merge(weight, core.detach(), [f.detach() for f in factors], 0.6)
    torch.testing.assert_close(merged, weight + expected.detach(), **F64)
    grads = ref.tucker_delta_backward(upstream, core.detach(), [f.detach() for f in factors], 0.6)
    expected_grads = torch.autograd.grad(expected, [core, *factors], upstream)
    assert len(grads) == len(expected_grads)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **F64)


# --------------------------------------------------------------------------- matrix exponential


def _special_matrices():
    g = _gen(1)
    nilpotent = torch.triu(_randn(g, 6, 6), diagonal=1)
    skew = _randn(g, 5, 5)
    return {
        "random": _randn(g, 4, 7, 7, scale=0.3),
        "nilpotent": nilpotent,
        "rotation-generator": skew - skew.T,
        "diagonal": torch.diag(_randn(g, 6, scale=2.0)),
        "large-norm": _randn(g, 2, 5, 5, scale=6.0),
        "ill-conditioned": torch.tensor([[1.0, 50.0], [0.0, 1.0 + 1e-8]], dtype=torch.float64),
        "one-by-one": _randn(g, 3, 1, 1),
        # a lone small-norm matrix, where torch.linalg.matrix_exp is off by ~1e-10
        "small-norm-2x2": torch.tensor([[0.0, -0.023146], [0.023146, 0.0]], dtype=torch.float64),
        "huge-and-tiny-in-one-batch": torch.stack([_randn(g, 4, 4, scale=20.0), _randn(g, 4, 4, scale=1e-3)]),
    }


@pytest.mark.parametrize("name,A", list(_special_matrices().items()), ids=lambda x: x if isinstance(x, str) else "")
def test_matrix_exp_matches_scipy(name, A):
    batch = A.reshape(-1, *A.shape[-2:]).numpy()
    expected = np.stack([scipy.linalg.expm(a) for a in batch]).reshape(A.shape)
    got = ref.matrix_exp(A).numpy()
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-12 * scale


@pytest.mark.parametrize("name,A", list(_special_matrices().items()), ids=lambda x: x if isinstance(x, str) else "")
def test_matrix_exp_backward_is_the_adjoint_frechet_derivative(name, A):
    """Against SciPy's Fréchet derivative L(Aᵀ, G), and the defining identity
    ⟨∂L/∂A, E⟩ = ⟨G, d/dh exp(A + hE)⟩ by a central difference."""
    g = _gen(2)
    G, E = _randn(g, *A.shape), _randn(g, *A.shape)
    got = ref.matrix_exp_backward(G, A)
    flat = lambda t: t.reshape(-1, *A.shape[-2:]).numpy()  # noqa: E731
    expected = np.stack(
        [scipy.linalg.expm_frechet(a.T, gm, compute_expm=False) for a, gm in zip(flat(A), flat(G))]
    ).reshape(A.shape)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
    h = 1e-6 / max(1.0, float(A.abs().max()))
    expm = lambda M: torch.from_numpy(np.stack([scipy.linalg.expm(m) for m in M.reshape(-1, *M.shape[-2:]).numpy()]).reshape(M.shape))  # noqa: E731
    directional = (expm(A + h * E) - expm(A - h * E)) / (2 * h)
    lhs, rhs = (got * E).sum().item(), (G * directional).sum().item()
    assert abs(lhs - rhs) <= 1e-5 * max(1.0, abs(rhs))


# --------------------------------------------------------------------------- kernelized


def naive_kernel(out_emb, in_emb, coeff, params, kernel, eps):
    """ΔW_raw by torch.cdist / matmul and autograd-friendly ops (SPEC §1 SNELL)."""
    alpha, beta, gamma = params
    chunks = out_emb.shape[0]
    full = lambda e: torch.cat(list(e), dim=-1)  # noqa: E731  (H, rows, p) -> (rows, H·p)
    if kernel in ("piecewise_linear", "mixture"):
        pw = sum(
            coeff[h] * torch.sqrt(torch.cdist(out_emb[h], in_emb[h]) ** 2 + eps) for h in range(chunks)
        )
        if kernel == "piecewise_linear":
            return pw
        return pw + alpha * torch.softmax(pw / gamma, dim=0) + beta
    b, a = full(out_emb), full(in_emb)
    if kernel == "rbf":
        return alpha * torch.exp(-beta * torch.cdist(b, a) ** 2) + gamma
    if kernel == "sigmoid":
        return alpha * torch.sigmoid(beta * b @ a.T) + gamma
    return b @ a.T


KERNEL_CASES = [("piecewise_linear", 2), ("piecewise_linear", 3), ("rbf", 2), ("sigmoid", 3),
                ("linear", 2), ("mixture", 2), ("mixture", 3)]  # fmt: skip
USES = {"piecewise_linear": (True, False), "rbf": (False, True), "sigmoid": (False, True),
        "linear": (False, False), "mixture": (True, True)}  # fmt: skip


def _kernel_inputs(g, chunks, m=7, n=6, width=3, dtype=torch.float64):
    out_emb = _randn(g, chunks, m, width, scale=0.7, dtype=dtype).requires_grad_()
    in_emb = _randn(g, chunks, n, width, scale=0.7, dtype=dtype).requires_grad_()
    coeff = _randn(g, chunks, scale=0.3, dtype=dtype).requires_grad_()
    params = torch.tensor([0.8, 0.6, 1.3], dtype=dtype).requires_grad_()
    return out_emb, in_emb, coeff, params


@pytest.mark.parametrize("kernel,chunks", KERNEL_CASES)
def test_kernelized_delta_and_backward_match_naive_autograd(kernel, chunks):
    g = _gen(3)
    inputs = _kernel_inputs(g, chunks)
    eps = 1e-9
    expected = naive_kernel(*inputs, kernel, eps)
    plain = [t.detach() for t in inputs]
    got = ref.kernelized_delta(plain[0], plain[1], kernel, plain[2], plain[3], eps)
    torch.testing.assert_close(got, expected.detach(), **F64)
    upstream = _randn(g, *expected.shape)
    grads = ref.kernelized_delta_backward(upstream, plain[0], plain[1], kernel, plain[2], plain[3], eps)
    expected_grads = torch.autograd.grad(expected, inputs, upstream, allow_unused=True)
    uses_coeff, uses_params = USES[kernel]
    for got_grad, want, used in zip(grads, expected_grads, (True, True, uses_coeff, uses_params)):
        if used:
            torch.testing.assert_close(got_grad, want, **F64)
        else:
            assert want is None and torch.count_nonzero(got_grad) == 0


def test_piecewise_gradient_is_finite_at_zero_distance():
    g = _gen(4)
    out_emb, in_emb, coeff, params = (t.detach() for t in _kernel_inputs(g, 2))
    in_emb[:, 2] = out_emb[:, 4]  # b_4 == a_2 in every chunk
    delta = ref.kernelized_delta(out_emb, in_emb, "piecewise_linear", coeff, params, 1e-12)
    torch.testing.assert_close(delta[4, 2], coeff.sum() * 1e-6, rtol=1e-9, atol=0)
    grads = ref.kernelized_delta_backward(torch.ones_like(delta), out_emb, in_emb, "piecewise_linear", coeff, params, 1e-12)
    assert all(torch.isfinite(t).all() for t in grads)


def test_kernelized_delta_float32_matches_float64():
    g = _gen(5)
    inputs64 = [t.detach() for t in _kernel_inputs(g, 2, m=33, n=17, width=4)]
    inputs32 = [t.float() for t in inputs64]
    for kernel in USES:
        got = ref.kernelized_delta(inputs32[0], inputs32[1], kernel, inputs32[2], inputs32[3], 1e-9)
        want = ref.kernelized_delta(inputs64[0], inputs64[1], kernel, inputs64[2], inputs64[3], 1e-9)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- sparsification


def _tied(g, shape):
    """Values from a small integer set with random signs: many ties in |ΔW|."""
    values = torch.randint(0, 4, shape, generator=g).double()
    signs = torch.randint(0, 2, shape, generator=g).double() * 2 - 1
    return values * signs


@pytest.mark.parametrize("data", ["random", "tied"])
def test_threshold_equals_brute_force_sort_including_ties(data):
    g = _gen(6)
    delta = _randn(g, 9, 11) if data == "random" else _tied(g, (9, 11))
    numel = delta.numel()
    ranked = delta.abs().flatten().sort().values
    for k in (0, 1, 2, numel // 3, numel // 2, numel - 1, numel):
        out, tau = ref.sparsify(delta, k, "hard")
        expected_tau = ranked[k - 1] if k > 0 else torch.tensor(-math.inf, dtype=delta.dtype)
        assert tau.item() == expected_tau.item()
        keep = delta.abs() > expected_tau
        assert keep.sum().item() <= numel - k  # ties at τ are dropped
        assert torch.equal(out, delta * delta.abs() * keep)


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("k", [0, 5, 40, 63])
def test_sparsify_forward_and_backward_match_naive(mode, k):
    g = _gen(7)
    delta = _randn(g, 9, 7).requires_grad_()
    upstream = _randn(g, 9, 7)
    expected = naive_sparsify(delta, k / delta.numel(), mode)
    out, tau = ref.sparsify(delta.detach(), k, mode)
    sorted_magnitudes = delta.detach().abs().flatten().sort().values
    assert tau.item() == (sorted_magnitudes[k - 1].item() if k else -math.inf)
    torch.testing.assert_close(out, expected.detach(), **F64)
    (expected_grad,) = torch.autograd.grad(expected, delta, upstream)
    torch.testing.assert_close(ref.sparsify_backward(upstream, delta.detach(), tau, mode), expected_grad, **F64)


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("kernel", ["piecewise_linear", "mixture", "rbf"])
def test_kernelized_sparse_delta_is_the_composition(kernel, mode):
    g = _gen(8)
    inputs = _kernel_inputs(g, 2)
    plain = [t.detach() for t in inputs]
    k = 17
    out, tau = ref.kernelized_sparse_delta(plain[0], plain[1], k, kernel, plain[2], plain[3], 1e-9, mode)
    raw = ref.kernelized_delta(plain[0], plain[1], kernel, plain[2], plain[3], 1e-9)
    expected_out, expected_tau = ref.sparsify(raw, k, mode)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    assert tau.item() == expected_tau.item()
    upstream = _randn(g, *out.shape)
    grads = ref.kernelized_sparse_delta_backward(upstream, plain[0], plain[1], tau, kernel, plain[2], plain[3], 1e-9, mode)
    d_raw = ref.sparsify_backward(upstream, raw, tau, mode)
    naive = naive_kernel(*inputs, kernel, 1e-9)
    expected_grads = torch.autograd.grad(naive, inputs, d_raw, allow_unused=True)
    for got_grad, want in zip(grads, expected_grads):
        if want is not None:
            torch.testing.assert_close(got_grad, want, **F64)


# --------------------------------------------------------------------------- LieRA merge


@pytest.mark.parametrize("exp", ["exact", "taylor1"])
@pytest.mark.parametrize("weight_shape", [(7, 5), (6, 2, 3, 3), (4, 3, 1, 2, 2)])
def test_lowrank_hadamard_merge_matches_naive(exp, weight_shape):
    g = _gen(9)
    weight = _randn(g, *weight_shape)
    n = weight.numel() // weight_shape[0]
    B = _randn(g, weight_shape[0], 3, scale=0.5).requires_grad_()
    A = _randn(g, 3, n, scale=0.5).requires_grad_()
    delta = (0.7 * B @ A).reshape(weight_shape)
    expected = weight * (torch.exp(delta) if exp == "exact" else 1 + delta)
    got = ref.lowrank_hadamard_merge(weight, B.detach(), A.detach(), 0.7, exp)
    torch.testing.assert_close(got, expected.detach(), **F64)
    upstream = _randn(g, *weight_shape)
    grads = ref.lowrank_hadamard_merge_backward(upstream, weight, B.detach(), A.detach(), 0.7, exp)
    for got_grad, want in zip(grads, torch.autograd.grad(expected, [B, A], upstream)):
        torch.testing.assert_close(got_grad, want, **F64)
