"""The reference backend against independent formulations written here: one einsum for
the Tucker update; SciPy's expm / expm_frechet and complex-step derivatives for the
matrix exponential; kernels by broadcasting over (m, n, p); the sparsity threshold by a
full sort; and torch.autograd through those naive versions for every explicit backward
formula. float64 mainly (rtol 1e-10), float32 against the float64 naive result (1e-5)."""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
import scipy.linalg
import torch

from tensor_peft.backends import reference as ref
from tensor_peft.backends.kernelized_ops import KernelProblem

F64, F32 = torch.float64, torch.float32
TOL = {F64: dict(rtol=1e-10, atol=1e-12), F32: dict(rtol=1e-5, atol=1e-5)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, scale=1.0, dtype=F64):
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)


def _grad_inputs(tensors, dtype=F64):
    """float64 leaves requiring grad for the naive version, holding the values the
    reference gets in ``dtype``."""
    return [t.to(dtype).to(F64).requires_grad_() for t in tensors]


def assert_matches(got, want, dtype=F64, **tol):
    """``got`` from the reference in ``dtype`` against the float64 naive ``want``."""
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, want.detach().to(dtype), **(TOL[dtype] | tol))


# --------------------------------------------------------------------------- Tucker


def einsum_tucker(core, factors, scale):
    """s · Σ_a G[a_0..a_{N-1}] Π_k U_k[i_k, a_k] as one einsum."""
    ranks, dims = string.ascii_letters[: core.dim()], string.ascii_letters[core.dim() : 2 * core.dim()]
    spec = ",".join([ranks] + [d + r for d, r in zip(dims, ranks)]) + "->" + dims
    return scale * torch.einsum(spec, core, *factors)


TUCKER_SHAPES = [
    ((5, 7), (3, 2)),
    ((1, 4), (1, 3)),
    ((6, 5, 3), (2, 3, 2)),
    ((6, 5, 3, 3), (3, 2, 2, 2)),
    ((4, 3, 3, 1, 2), (2, 3, 2, 1, 2)),
]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("dims,ranks", TUCKER_SHAPES)
def test_tucker_forward_merge_and_backward_match_einsum(dims, ranks, dtype):
    g = _gen(0)
    core, *factors = [_randn(g, *ranks)] + [_randn(g, d, r) for d, r in zip(dims, ranks)]
    weight, upstream = _randn(g, *dims), _randn(g, *dims)
    leaves = _grad_inputs([core, *factors], dtype)
    expected = einsum_tucker(leaves[0], leaves[1:], 0.6)
    core, factors = core.to(dtype), [f.to(dtype) for f in factors]
    assert_matches(ref.tucker_delta(core, factors, 0.6), expected, dtype)
    merged = ref.tucker_merge(weight.to(dtype), core, factors, 0.6)
    assert_matches(merged, weight.to(dtype).double() + expected, dtype)
    grads = ref.tucker_delta_backward(upstream.to(dtype), core, factors, 0.6)
    expected_grads = torch.autograd.grad(expected, leaves, upstream.to(dtype).double())
    assert len(grads) == len(dims) + 1
    for got, want in zip(grads, expected_grads):
        assert_matches(got, want, dtype)


# --------------------------------------------------------------------------- matrix exponential


def scipy_expm(A: torch.Tensor) -> np.ndarray:
    batch = A.reshape(-1, *A.shape[-2:]).numpy()
    return np.stack([scipy.linalg.expm(a) for a in batch]).reshape(A.shape)


def _special_matrices():
    g = _gen(1)
    skew = _randn(g, 5, 5)
    return {
        "random-batch": _randn(g, 4, 7, 7, scale=0.3),
        "batch-of-one": _randn(g, 1, 5, 5),
        "nilpotent": torch.triu(_randn(g, 6, 6), diagonal=1),
        "rotation-generator": skew - skew.T,
        "diagonal": torch.diag(_randn(g, 6, scale=2.0)),
        "large-norm": _randn(g, 2, 5, 5, scale=6.0),
        "ill-conditioned": torch.tensor([[1.0, 50.0], [0.0, 1.0 + 1e-8]], dtype=F64),
        "one-by-one": _randn(g, 3, 1, 1),
        "zero": torch.zeros(2, 3, 3, dtype=F64),
        # a lone small-norm matrix, where torch.linalg.matrix_exp is off by ~5e-12
        "small-norm-2x2": torch.tensor([[0.0, -0.023146], [0.023146, 0.0]], dtype=F64),
        "huge-and-tiny-in-one-batch": torch.stack([_randn(g, 4, 4, scale=20.0), _randn(g, 4, 4, scale=1e-3)]),
        "2d-batch": _randn(g, 2, 3, 4, 4, scale=0.8),
    }


MATRICES = list(_special_matrices().items())
MATRIX_IDS = [name for name, _ in MATRICES]


def assert_close_per_matrix(got, expected, A, rtol):
    """Each matrix of the batch within rtol·max(1, ‖A‖₁) of its own largest entry (the
    relative condition number of exp grows like ‖A‖)."""
    flat = lambda t: np.asarray(t).reshape(-1, *A.shape[-2:])  # noqa: E731
    for g, e, a in zip(flat(got), flat(expected), flat(A)):
        bound = rtol * max(1.0, np.linalg.norm(a, 1)) * np.abs(e).max()
        assert np.abs(g - e).max() <= bound


@pytest.mark.parametrize("name,A", MATRICES, ids=MATRIX_IDS)
def test_matrix_exp_matches_scipy(name, A):
    expected = scipy_expm(A)
    got = ref.matrix_exp(A)
    assert got.dtype == F64 and got.shape == A.shape and got.is_contiguous()
    assert_close_per_matrix(got.numpy(), expected, A, 1e-13)


def test_matrix_exp_float32_matches_scipy():
    A = _randn(_gen(11), 3, 6, 6, scale=1.5, dtype=F32)
    expected = scipy_expm(A.double())
    got = ref.matrix_exp(A)
    assert got.dtype == F32
    assert_close_per_matrix(got.double().numpy(), expected, A.double(), 1e-6)


def _frechet_adjoint_scipy(A, G) -> np.ndarray:
    """L(Aᵀ, G) per matrix, by SciPy."""
    flat = lambda t: t.reshape(-1, *A.shape[-2:]).numpy()  # noqa: E731
    pairs = zip(flat(A), flat(G))
    return np.stack([scipy.linalg.expm_frechet(a.T, gm, compute_expm=False) for a, gm in pairs]).reshape(A.shape)


@pytest.mark.parametrize("name,A", MATRICES, ids=MATRIX_IDS)
def test_matrix_exp_backward_is_the_adjoint_frechet_derivative(name, A):
    """Against SciPy's L(Aᵀ, G), and the defining identity ⟨∂L/∂A, E⟩ = ⟨G, d/dh exp(A + hE)⟩
    with the derivative by the complex step Im exp(A + ihE)/h (no cancellation)."""
    g = _gen(2)
    G, E = _randn(g, *A.shape), _randn(g, *A.shape)
    got = ref.matrix_exp_backward(G, A)
    assert got.dtype == F64 and got.shape == A.shape and got.is_contiguous()
    expected = _frechet_adjoint_scipy(A, G)
    assert_close_per_matrix(got.numpy(), expected, A, 1e-12)
    h = 1e-20
    directional = scipy_expm(A.to(torch.complex128) + 1j * h * E).imag / h
    lhs, rhs = (got * E).sum().item(), (G.numpy() * directional).sum()
    assert abs(lhs - rhs) <= 1e-11 * (np.abs(G.numpy()) * np.abs(directional)).sum()


@pytest.mark.parametrize("gradient_scale", [1e-8, 1e4, 1e8])
def test_matrix_exp_backward_is_accurate_for_any_gradient_magnitude(gradient_scale):
    g = _gen(12)
    A, G = _randn(g, 3, 5, 5), _randn(g, 3, 5, 5, scale=gradient_scale)
    expected = _frechet_adjoint_scipy(A, G)
    assert_close_per_matrix(ref.matrix_exp_backward(G, A).numpy(), expected, A, 1e-13)


def test_matrix_exp_backward_float32_and_complex():
    """float32 against SciPy; complex against torch's own autograd (the conjugate
    convention: ∂L/∂A = L(Aᴴ, G))."""
    g = _gen(13)
    A, G = _randn(g, 2, 4, 4, dtype=F32), _randn(g, 2, 4, 4, dtype=F32)
    got = ref.matrix_exp_backward(G, A)
    expected = _frechet_adjoint_scipy(A.double(), G.double())
    assert got.dtype == F32
    assert_close_per_matrix(got.double().numpy(), expected, A.double(), 1e-6)
    A = torch.complex(_randn(g, 2, 4, 4), _randn(g, 2, 4, 4)).requires_grad_()
    G = torch.complex(_randn(g, 2, 4, 4), _randn(g, 2, 4, 4))
    (want,) = torch.autograd.grad(torch.linalg.matrix_exp(A), A, G)
    torch.testing.assert_close(ref.matrix_exp_backward(G, A.detach()), want, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- kernelized


def naive_kernel(out_emb, in_emb, kernel, coeff, params, eps):
    """ΔW_raw by broadcasting over (m, n, p), written from the SNELL/SNELLA kernel definitions."""
    alpha, beta, gamma = params
    sqdist = lambda b, a: ((b[:, None, :] - a[None, :, :]) ** 2).sum(-1)  # noqa: E731
    if kernel in ("piecewise_linear", "mixture"):
        P = sum(coeff[h] * torch.sqrt(sqdist(out_emb[h], in_emb[h]) + eps) for h in range(len(coeff)))
        if kernel == "piecewise_linear":
            return P
        return P + alpha * torch.softmax(P / gamma, dim=0) + beta
    b, a = torch.cat(list(out_emb), dim=-1), torch.cat(list(in_emb), dim=-1)  # (rows, H·p)
    if kernel == "rbf":
        return alpha * torch.exp(-beta * sqdist(b, a)) + gamma
    if kernel == "sigmoid":
        return alpha * torch.sigmoid(beta * (b[:, None, :] * a[None, :, :]).sum(-1)) + gamma
    return (b[:, None, :] * a[None, :, :]).sum(-1)


KERNELS = ("piecewise_linear", "rbf", "sigmoid", "linear", "mixture")
# which of (coeff, params) each kernel uses
USES = {"piecewise_linear": (True, False), "rbf": (False, True), "sigmoid": (False, True),
        "linear": (False, False), "mixture": (True, True)}  # fmt: skip
EPS = 1e-9


def _kernel_inputs(g, chunks, m=7, n=6, width=3):
    out_emb = _randn(g, chunks, m, width, scale=0.7)
    in_emb = _randn(g, chunks, n, width, scale=0.7)
    coeff = _randn(g, chunks, scale=0.3)
    params = torch.tensor([0.8, 0.6, 1.3], dtype=F64)
    return [out_emb, in_emb, coeff, params]


def check_kernel_grads(grads, inputs, expected_grads, kernel, dtype=F64, **tol):
    """All four gradients: shapes as the inputs, the used ones equal to autograd's,
    the unused ones zeros."""
    uses_coeff, uses_params = USES[kernel]
    assert len(grads) == 4
    for got, x, want, used in zip(grads, inputs, expected_grads, (True, True, uses_coeff, uses_params)):
        assert got.shape == x.shape
        if used:
            assert_matches(got, want, dtype, **tol)
        else:
            assert want is None and got.dtype == dtype and torch.count_nonzero(got) == 0


CASES = [(kernel, chunks, F64) for kernel in KERNELS for chunks in (2, 3)] + [
    (kernel, 2, F32) for kernel in KERNELS
]


@pytest.mark.parametrize("kernel,chunks,dtype", CASES)
def test_kernelized_delta_and_backward_match_naive_autograd(kernel, chunks, dtype):
    g = _gen(3)
    inputs = _kernel_inputs(g, chunks)
    upstream = _randn(g, 7, 6)
    leaves = _grad_inputs(inputs, dtype)
    expected = naive_kernel(leaves[0], leaves[1], kernel, leaves[2], leaves[3], EPS)
    out_emb, in_emb, coeff, params = (t.to(dtype) for t in inputs)
    problem = KernelProblem(out_emb, in_emb, kernel, coeff, params, EPS)
    assert_matches(ref.kernelized_delta(problem), expected, dtype)
    grads = ref.kernelized_delta_backward(upstream.to(dtype), problem)
    expected_grads = torch.autograd.grad(expected, leaves, upstream.to(dtype).double(), allow_unused=True)
    check_kernel_grads(grads, inputs, expected_grads, kernel, dtype)


@pytest.mark.parametrize("kernel", ["piecewise_linear", "mixture", "rbf"])
def test_kernelized_row_blocks_are_exact(kernel, monkeypatch):
    """Tiny row blocks (11 rows: several, the last one short) give the naive result."""
    monkeypatch.setattr(ref, "_BLOCK_ELEMENTS", 40)  # blocks of 40 // (6·3) = 2 rows (piecewise), 1 (rbf)
    g = _gen(14)
    inputs = _kernel_inputs(g, 2, m=11)
    upstream = _randn(g, 11, 6)
    leaves = _grad_inputs(inputs)
    expected = naive_kernel(leaves[0], leaves[1], kernel, leaves[2], leaves[3], EPS)
    problem = KernelProblem(*inputs[:2], kernel, *inputs[2:], EPS)
    assert_matches(ref.kernelized_delta(problem), expected)
    grads = ref.kernelized_delta_backward(upstream, problem)
    check_kernel_grads(grads, inputs, torch.autograd.grad(expected, leaves, upstream, allow_unused=True), kernel)


def test_squared_distances_blocks_cover_every_row(monkeypatch):
    monkeypatch.setattr(ref, "_BLOCK_ELEMENTS", 2 * 5 * 3 + 1)  # two rows per block, 7 rows
    g = _gen(15)
    rows, cols = _randn(g, 7, 3), _randn(g, 5, 3)
    expected = ((rows[:, None] - cols[None]) ** 2).sum(-1)
    assert_matches(ref.squared_distances(rows, cols), expected)


@pytest.mark.parametrize("kernel", ["piecewise_linear", "mixture"])
def test_piecewise_gradient_is_finite_at_zero_distance(kernel):
    """b_4 == a_2 in every chunk: the entry is Σ_h coeff[h]·sqrt(eps) and the gradient
    is finite and equal to autograd's of sqrt(d² + eps)."""
    g = _gen(4)
    inputs = _kernel_inputs(g, 2)
    inputs[1][:, 2] = inputs[0][:, 4]
    eps = 1e-12
    problem = KernelProblem(*inputs[:2], kernel, *inputs[2:], eps)
    delta = ref.kernelized_delta(problem)
    if kernel == "piecewise_linear":
        torch.testing.assert_close(delta[4, 2], inputs[2].sum() * 1e-6, rtol=1e-9, atol=0)
    upstream = _randn(g, 7, 6)
    grads = ref.kernelized_delta_backward(upstream, problem)
    assert all(torch.isfinite(t).all() for t in grads)
    leaves = _grad_inputs(inputs)
    expected = naive_kernel(leaves[0], leaves[1], kernel, leaves[2], leaves[3], eps)
    expected_grads = torch.autograd.grad(expected, leaves, upstream, allow_unused=True)
    # the weight Γ·coeff/r is ~1e6 at r = sqrt(eps) and multiplies b_4 and a_2 separately:
    # a rounding of ~1e6 · 2^-52 · |b| in the row/column sums that cancel to b_4 − a_2 = 0
    check_kernel_grads(grads, inputs, expected_grads, kernel, atol=1e-8)


# --------------------------------------------------------------------------- sparsification


def naive_sparsify(delta, k, mode):
    """SNELL's competition sparsification by a full sort, with τ (and |ΔW| in hard mode)
    detached, as stop-gradients; the mask drops ties at τ."""
    magnitude = delta.detach().abs()
    tau = magnitude.flatten().sort().values[k - 1] if k > 0 else delta.new_tensor(-math.inf).detach()
    keep = magnitude > tau
    if mode == "hard":
        return delta * magnitude * keep, tau
    return delta * torch.clamp(delta.abs() - tau.clamp_min(0), min=0) * keep, tau


def _tied(g, shape):
    """Values from {1, 2, 3} with random signs: many ties in |ΔW|, no zeros."""
    values = torch.randint(1, 4, shape, generator=g).double()
    signs = torch.randint(0, 2, shape, generator=g).double() * 2 - 1
    return values * signs


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("data", ["random", "tied"])
def test_threshold_is_the_kth_sorted_magnitude_including_ties(data, mode):
    g = _gen(6)
    delta = _randn(g, 9, 11) if data == "random" else _tied(g, (9, 11))
    numel = delta.numel()
    ranked = delta.abs().flatten().sort().values
    kept_counts = []
    for k in (0, 1, 2, numel // 3, numel // 2, numel - 1, numel):
        out, tau = ref.sparsify(delta, k, mode)
        expected_tau = ranked[k - 1].item() if k > 0 else -math.inf
        assert tau.dim() == 0 and tau.dtype == F64 and tau.item() == expected_tau
        kept = int((delta.abs() > expected_tau).sum())
        assert int(out.ne(0).sum()) == kept  # ΔW has no zeros: out ≠ 0 exactly where kept
        kept_counts.append((kept, numel - k))
    # ties at τ are dropped: fewer than numel − k kept, which happens only with ties
    assert all(kept <= bound for kept, bound in kept_counts)
    assert (data == "tied") == any(kept < bound for kept, bound in kept_counts)


SPARSIFY_CASES = [(mode, k, F64) for mode in ("hard", "soft") for k in (0, 1, 31, 62, 63)] + [
    (mode, 20, F32) for mode in ("hard", "soft")
]


@pytest.mark.parametrize("mode,k,dtype", SPARSIFY_CASES)
def test_sparsify_forward_and_backward_match_naive_autograd(mode, k, dtype):
    g = _gen(7)
    delta, upstream = _randn(g, 9, 7).to(dtype), _randn(g, 9, 7).to(dtype)
    (leaf,) = _grad_inputs([delta], dtype)
    expected, expected_tau = naive_sparsify(leaf, k, mode)
    out, tau = ref.sparsify(delta, k, mode)
    assert tau.dtype == dtype and tau.item() == expected_tau.item()
    assert_matches(out, expected, dtype)
    (expected_grad,) = torch.autograd.grad(expected, leaf, upstream.double())
    assert_matches(ref.sparsify_backward(upstream, delta, tau, mode), expected_grad, dtype)


def test_unknown_names_raise_value_error():
    g = _gen(16)
    delta = _randn(g, 3, 4)
    out_emb, in_emb, coeff, params = _kernel_inputs(g, 2)
    B, A = _randn(g, 3, 2), _randn(g, 2, 4)
    calls = [
        lambda: ref.sparsify(delta, 2, "medium"),
        lambda: ref.sparsify_backward(delta, delta, delta.new_tensor(0.5), "medium"),
        lambda: ref.kernelized_delta(KernelProblem(out_emb, in_emb, "cosine", coeff, params, EPS)),
        lambda: ref.kernelized_delta_backward(delta, KernelProblem(out_emb, in_emb, "cosine", coeff, params, EPS)),
        lambda: ref.lowrank_hadamard_merge(delta, B, A, 1.0, "taylor2"),
        lambda: ref.lowrank_hadamard_merge_backward(delta, delta, B, A, 1.0, "taylor2"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="must be one of"):
            call()


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernelized_sparse_delta_is_the_composition(kernel, mode):
    """Forward: exactly sparsify(kernelized_delta); backward: equal to the two backwards
    composed and to autograd through naive_sparsify(naive_kernel)."""
    g = _gen(8)
    inputs = _kernel_inputs(g, 2)
    out_emb, in_emb, coeff, params = inputs
    k = 17
    problem = KernelProblem(out_emb, in_emb, kernel, coeff, params, EPS, mode)
    out, tau = ref.kernelized_sparse_delta(problem, k)
    raw = ref.kernelized_delta(problem)
    expected_out, expected_tau = ref.sparsify(raw, k, mode)
    assert torch.equal(out, expected_out) and torch.equal(tau, expected_tau)
    upstream = _randn(g, *out.shape)
    grads = ref.kernelized_sparse_delta_backward(upstream, problem, tau)
    composed = ref.kernelized_delta_backward(ref.sparsify_backward(upstream, raw, tau, mode), problem)
    for got, want in zip(grads, composed, strict=True):
        assert torch.equal(got, want)
    leaves = _grad_inputs(inputs)
    naive_raw = naive_kernel(leaves[0], leaves[1], kernel, leaves[2], leaves[3], EPS)
    naive, naive_tau = naive_sparsify(naive_raw, k, mode)
    assert tau.item() == pytest.approx(naive_tau.item(), rel=1e-12)
    assert_matches(out, naive)
    check_kernel_grads(grads, inputs, torch.autograd.grad(naive, leaves, upstream, allow_unused=True), kernel)


# --------------------------------------------------------------------------- LieRA merge


LIERA_SHAPES = [(7, 5), (1, 4), (6, 2, 3, 3), (4, 3, 1, 2, 2)]  # Linear, one row, Conv2d, Conv3d
LIERA_CASES = [(shape, exp, F64) for shape in LIERA_SHAPES for exp in ("exact", "taylor1")] + [
    ((6, 2, 3, 3), exp, F32) for exp in ("exact", "taylor1")
]


@pytest.mark.parametrize("weight_shape,exp,dtype", LIERA_CASES)
def test_lowrank_hadamard_merge_and_backward_match_naive_autograd(weight_shape, exp, dtype):
    g = _gen(9)
    m, n = weight_shape[0], math.prod(weight_shape[1:])
    weight, upstream = _randn(g, *weight_shape).to(dtype), _randn(g, *weight_shape).to(dtype)
    B, A = _randn(g, m, 3, scale=0.5), _randn(g, 3, n, scale=0.5)
    leaves = _grad_inputs([B, A], dtype)
    delta = (0.7 * leaves[0] @ leaves[1]).reshape(weight_shape)
    expected = weight.double() * (torch.exp(delta) if exp == "exact" else 1 + delta)
    B, A = B.to(dtype), A.to(dtype)
    assert_matches(ref.lowrank_hadamard_merge(weight, B, A, 0.7, exp), expected, dtype)
    grads = ref.lowrank_hadamard_merge_backward(upstream, weight, B, A, 0.7, exp)
    expected_grads = torch.autograd.grad(expected, leaves, upstream.double())
    assert len(grads) == 2
    for got, want in zip(grads, expected_grads):
        assert_matches(got, want, dtype)
