"""The Triton threshold search with its candidates buffer: τ is bitwise the k-th smallest
|x| of ``torch.kthvalue`` on random data, heavy ties, all-equal and zero inputs, for
k = 1 … numel, float32 and float64, both when the candidates fit in the buffer and when
they do not (a buffer of 1 or 5 entries: the passes fall back to the whole input)."""

from __future__ import annotations

import pytest
import torch

from tensor_peft.backends import available

pytestmark = pytest.mark.skipif("triton" not in available("cpu"), reason="triton is not installed")


def _kernelized():
    from tensor_peft.backends.triton import kernelized

    return kernelized


def inputs(kind: str, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.randn(29, 37, generator=generator, dtype=torch.float64).to(dtype)
    if kind == "ties":  # three magnitudes, both signs
        levels = torch.tensor([0.5, 1.5, 2.0], dtype=dtype)
        signs = (torch.randint(0, 2, (23, 31), generator=generator) * 2 - 1).to(dtype)
        return levels[torch.randint(0, 3, (23, 31), generator=generator)] * signs
    if kind == "equal":
        return torch.full((17, 19), -0.3, dtype=dtype)
    zeros = torch.zeros(21, 13, dtype=dtype)  # mostly ±0, a few small values
    zeros[::4, ::3] = torch.randn(6, 5, generator=generator, dtype=torch.float64).to(dtype) * 1e-3
    zeros[1::4, ::5] = -0.0
    return zeros


def expected_tau(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.abs().flatten().kthvalue(k).values


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    integer = torch.int64 if a.dtype == torch.float64 else torch.int32
    return a.dtype == b.dtype and torch.equal(a.reshape(1).view(integer), b.reshape(1).view(integer))


@pytest.mark.parametrize("capacity", [None, 1, 5], ids=["buffer", "fallback-1", "fallback-5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "ties", "equal", "zeros"])
def test_sparsify_threshold_is_the_kth_smallest_magnitude(monkeypatch, kind, dtype, capacity):
    kernelized = _kernelized()
    if capacity is not None:
        monkeypatch.setattr(kernelized, "_candidate_capacity", lambda numel: capacity)
    x = inputs(kind, dtype, torch.Generator().manual_seed(16))
    for k in sorted({1, 2, x.numel() // 3, x.numel() // 2, x.numel() - 1, x.numel()}):
        _, tau = kernelized.sparsify(x, k, "hard")
        assert same_bits(tau, expected_tau(x, k)), (k, tau.item(), expected_tau(x, k).item())


@pytest.mark.parametrize("capacity", [None, 1], ids=["buffer", "fallback"])
def test_the_compaction_finds_exactly_the_keys_of_the_kths_bin(monkeypatch, capacity):
    """The candidates counted are the entries whose magnitude shares the k-th's first
    digit (counted here from the float bits); on normal data they fit the default buffer,
    and a buffer of 1 entry does not hold them."""
    kernelized = _kernelized()
    if capacity is not None:
        monkeypatch.setattr(kernelized, "_candidate_capacity", lambda numel: capacity)
    found_counts = []
    refine = kernelized.refine_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(x, count, candidates, found, *args, **kwargs):
                refine[grid](x, count, candidates, found, *args, **kwargs)
                found_counts.append(int(found[0]))

            return launch

    monkeypatch.setattr(kernelized, "refine_kernel", Recording())
    x = torch.randn(40, 50, generator=torch.Generator().manual_seed(3))
    k = x.numel() // 2
    _, tau = kernelized.sparsify(x, k, "soft")
    assert same_bits(tau, expected_tau(x, k))
    first_shift = kernelized._shifts(x.dtype)[0]
    keys = x.abs().view(torch.int32) >> first_shift
    in_bin = int((keys == (expected_tau(x, k).view(torch.int32) >> first_shift)).sum())
    assert found_counts and set(found_counts) == {in_bin}
    assert (in_bin <= kernelized._candidate_capacity(x.numel())) == (capacity is None)


@pytest.mark.parametrize("capacity", [None, 1], ids=["buffer", "fallback"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_threshold_with_and_without_the_buffer(monkeypatch, dtype, capacity):
    """kernelized_sparse_delta counts the first digit while computing κ; τ against a sort
    of the dense update (linear kernel of small integers: exact products, many ties)."""
    kernelized = _kernelized()
    if capacity is not None:
        monkeypatch.setattr(kernelized, "_candidate_capacity", lambda numel: capacity)
    generator = torch.Generator().manual_seed(9)
    out_emb = torch.randint(-3, 4, (2, 19, 2), generator=generator).to(dtype)
    in_emb = torch.randint(-3, 4, (2, 27, 2), generator=generator).to(dtype) / 8
    coeff, params = torch.ones(2, dtype=dtype), torch.zeros(3, dtype=dtype)
    raw = out_emb.permute(1, 0, 2).reshape(19, 4) @ in_emb.permute(1, 0, 2).reshape(27, 4).T
    for k in (1, raw.numel() // 4, raw.numel()):
        _, tau = kernelized.kernelized_sparse_delta(out_emb, in_emb, k, "linear", coeff, params, 0.0, "hard")
        assert same_bits(tau, expected_tau(raw, k)), k
