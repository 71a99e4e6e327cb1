"""The CUDA kernels compute mixture's entries with the math the CPU kernels share
(tensor_peft/kernelized.h): K = P + (α·S + β), S from exp((P − max_j P)/γ), and ∂γ from
P − max_j P. At a small γ the older form exp(P/γ − max_j P/γ) is off by the rounding of
P/γ, magnified by exp: thousands of units in the last place.

The embeddings are multiples of 2⁻⁸ and the chunk coefficients powers of two, so that P
has the same bits with and without fused multiply-adds (the cpu kernels are compiled with
them on this machine, the emulated ones without). What is left between the two backends
is their exp (vector_exp against the host's, apart by a unit in the last place on a few
entries), the contraction of α·S + β and the order of the gradients' sums."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends, ops

pytestmark = pytest.mark.skipif(
    backends.why_unavailable("cuda_emulated", "cpu") is not None,
    reason=f"cuda_emulated: {backends.why_unavailable('cuda_emulated', 'cpu')}",
)

GAMMA = 1e-3


def _inputs(seed: int, dtype: torch.dtype, m: int = 12, n: int = 9, chunks: int = 2, width: int = 4):
    """Rows of Out close to one another, so that each column's P lie within a few γ."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-64, 64, (chunks, 1, width), generator=g)
    out_emb = (base + torch.randint(-2, 3, (chunks, m, width), generator=g)) / 256
    in_emb = torch.randint(-256, 256, (chunks, n, width), generator=g) / 256
    params = {
        "coeff": torch.tensor([0.5, 2.0][:chunks], dtype=dtype),
        "alpha": torch.tensor(1.0, dtype=dtype),
        "beta": torch.tensor(0.25, dtype=dtype),
        "gamma": torch.tensor(GAMMA, dtype=dtype),
    }
    return out_emb.to(dtype), in_emb.to(dtype), params


def _ulps(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest difference in units in the last place of the expected entry."""
    magnitude = expected.abs()
    spacing = torch.nextafter(magnitude, torch.tensor(float("inf"), dtype=expected.dtype)) - magnitude
    return ((got - expected).abs() / spacing).max().item()


def _run(backend: str, out_emb, in_emb, params, mode, upstream):
    leaves = [t.clone().requires_grad_() for t in (out_emb, in_emb, *params.values())]
    kernel_params = dict(zip(params, leaves[2:]))
    with backends.use(backend):
        if mode is None:
            delta = ops.kernelized_delta(leaves[0], leaves[1], "mixture", **kernel_params)
        else:
            delta = ops.kernelized_sparse_delta(leaves[0], leaves[1], 0.5, "mixture", mode, **kernel_params)
        grads = torch.autograd.grad((delta * upstream).sum(), leaves)
    return delta.detach(), grads


# (m, n): under a column tile and a strip of rows each; several of both, the last partial.
SHAPES = [(12, 9), (40, 70)]


@pytest.mark.parametrize("mode", [None, "hard", "soft"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mixture_rounds_as_the_cpu_kernels(shape, seed, mode):
    """The forward to the last unit (bit for bit but where the two exps round apart); the
    gradients to the rounding of their sums, which are added in another order (the
    embeddings' and coeff's of terms about α/γ times larger than the result)."""
    out_emb, in_emb, params = _inputs(seed, torch.float32, *shape)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed))
    cpu, cpu_grads = _run("cpu", out_emb, in_emb, params, mode, upstream)
    emulated, emulated_grads = _run("cuda_emulated", out_emb, in_emb, params, mode, upstream)
    assert (cpu != 0).any()
    if mode is None:
        assert _ulps(emulated, cpu) <= 1
    else:  # K·|K| or K·(|K| − τ): a unit of K is up to 2|K| units of the output
        raw = ops.kernelized_delta(out_emb, in_emb, "mixture", **params)
        assert torch.equal(emulated == 0, cpu == 0)
        assert ((emulated - cpu).abs() <= 2 * torch.finfo(raw.dtype).eps * raw.square()).all()
    tolerances = {"out_emb": 1e-4, "in_emb": 1e-4, "coeff": 1e-4, "alpha": 2e-6, "beta": 2e-6, "gamma": 2e-6}
    for (name, tolerance), got, expected in zip(tolerances.items(), emulated_grads, cpu_grads):
        error = (got - expected).abs().max().item() / expected.abs().max().item()
        assert error <= tolerance, (name, error)


@pytest.mark.parametrize("order,seed", [("reverse", 0), ("shuffle", 7)])
def test_column_statistics_are_the_same_at_every_schedule(order, seed):
    """The column pass combines its strips' maxima and sums in a fixed order: a schedule of
    the threads and blocks changes no bit of the forward (which reads only those)."""
    out_emb, in_emb, params = _inputs(3, torch.float64, 40, 70)
    upstream = torch.randn(40, 70, dtype=torch.float64)
    expected, _ = _run("cuda_emulated", out_emb, in_emb, params, "soft", upstream)
    from tensor_peft import _cuda_emulated

    _cuda_emulated.set_schedule(order, seed)
    try:
        got, _ = _run("cuda_emulated", out_emb, in_emb, params, "soft", upstream)
    finally:
        _cuda_emulated.set_schedule("forward", 0)
    assert torch.equal(got, expected)
