"""The Triton threshold search with its candidates buffer: τ is bitwise the k-th smallest
|x| of ``torch.kthvalue`` on random data, heavy ties, all-equal and zero inputs, for
k = 1 … numel, float32 and float64, both when the candidates fit in the buffer and when
they do not (a buffer of 1 or 5 entries: passes read the whole input again, and float64's
copy out the candidates of a longer prefix)."""

from __future__ import annotations

import pytest
import torch

from tensor_peft.backends import available
from tensor_peft.backends.kernelized_ops import KernelProblem

pytestmark = pytest.mark.skipif("triton" not in available("cpu"), reason="triton is not installed")


def _select():
    from tensor_peft.backends.triton import select

    return select


def inputs(kind: str, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.randn(29, 37, generator=generator, dtype=torch.float64).to(dtype)
    if kind == "ties":  # three magnitudes, both signs
        levels = torch.tensor([0.5, 1.5, 2.0], dtype=dtype)
        signs = (torch.randint(0, 2, (23, 31), generator=generator) * 2 - 1).to(dtype)
        return levels[torch.randint(0, 3, (23, 31), generator=generator)] * signs
    if kind == "narrow":  # magnitudes within 0.1% of 1, as κ of an RBF kernel near its peak
        signs = (torch.randint(0, 2, (25, 27), generator=generator) * 2 - 1).to(torch.float64)
        return ((1 + 1e-3 * torch.rand(25, 27, generator=generator, dtype=torch.float64)) * signs).to(dtype)
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


def recorded_lengths(monkeypatch, select) -> list[tuple[int, int]]:
    """A list that receives, per refine_kernel launch, (candidates before the pass, after it)."""
    seen, refine = [], select.refine_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(x, count, candidates, lengths, *args, **kwargs):
                refine[grid](x, count, candidates, lengths, *args, **kwargs)
                seen.append((int(lengths[0]), int(lengths[1])))

            return launch

    monkeypatch.setattr(select, "refine_kernel", Recording())
    return seen


@pytest.mark.parametrize("capacity", [None, 1, 5], ids=["buffer", "fallback-1", "fallback-5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "ties", "narrow", "equal", "zeros"])
def test_sparsify_threshold_is_the_kth_smallest_magnitude(monkeypatch, kind, dtype, capacity):
    select = _select()
    if capacity is not None:
        monkeypatch.setattr(select, "_candidate_capacity", lambda numel: capacity)
    x = inputs(kind, dtype, torch.Generator().manual_seed(16))
    for k in sorted({1, 2, x.numel() // 3, x.numel() // 2, x.numel() - 1, x.numel()}):
        _, tau = select.sparsify(x, k, "hard")
        assert same_bits(tau, expected_tau(x, k)), (k, tau.item(), expected_tau(x, k).item())


@pytest.mark.parametrize("capacity", [None, 1], ids=["buffer", "fallback"])
def test_the_compaction_finds_exactly_the_keys_of_the_kths_bin(monkeypatch, capacity):
    """float32: the compacting pass counts the entries whose magnitude shares the k-th's
    first digit (counted here from the float bits); on normal data they fit the default
    buffer and the last pass reads them only, and a buffer of 1 entry does not hold them
    and the last pass reads everything."""
    select = _select()
    if capacity is not None:
        monkeypatch.setattr(select, "_candidate_capacity", lambda numel: capacity)
    lengths_seen = recorded_lengths(monkeypatch, select)
    x = torch.randn(40, 50, generator=torch.Generator().manual_seed(3))
    k = x.numel() // 2
    _, tau = select.sparsify(x, k, "soft")
    assert same_bits(tau, expected_tau(x, k))
    first_shift = select._shifts(x.dtype)[0]
    keys = x.abs().view(torch.int32) >> first_shift
    in_bin = int((keys == (expected_tau(x, k).view(torch.int32) >> first_shift)).sum())
    buffer = select._candidate_capacity(x.numel())
    assert len(lengths_seen) == 2 and lengths_seen[0] == (buffer + 1, in_bin) and lengths_seen[1][0] == in_bin
    assert (in_bin <= buffer) == (capacity is None)


@pytest.mark.parametrize("capacity", [None, 1], ids=["buffer", "fallback"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_threshold_with_and_without_the_buffer(monkeypatch, dtype, capacity):
    """kernelized_sparse_delta counts the first digit while computing κ; τ against a sort
    of the dense update (linear kernel of small multiples of 1/8: exact products, many
    ties)."""
    select = _select()
    from tensor_peft.backends.triton.kernelized import kernelized_sparse_delta

    if capacity is not None:
        monkeypatch.setattr(select, "_candidate_capacity", lambda numel: capacity)
    generator = torch.Generator().manual_seed(9)
    out_emb = torch.randint(-3, 4, (2, 19, 2), generator=generator).to(dtype)
    in_emb = torch.randint(-3, 4, (2, 27, 2), generator=generator).to(dtype) / 8
    coeff, params = torch.ones(2, dtype=dtype), torch.zeros(3, dtype=dtype)
    raw = out_emb.permute(1, 0, 2).reshape(19, 4) @ in_emb.permute(1, 0, 2).reshape(27, 4).T
    for k in (1, raw.numel() // 4, raw.numel()):
        _, tau = kernelized_sparse_delta(KernelProblem(out_emb, in_emb, "linear", coeff, params, 0.0, "hard"), k)
        assert same_bits(tau, expected_tau(raw, k)), k


def test_float64_copies_out_a_longer_prefix_when_the_first_candidates_overflow(monkeypatch):
    """Magnitudes within 0.1% of 1 share their first two digits: the compacting pass
    overflows the buffer, the next reads everything and copies out the few that share
    three digits, and the last two read only those."""
    select = _select()
    lengths_seen = recorded_lengths(monkeypatch, select)
    x = inputs("narrow", torch.float64, torch.Generator().manual_seed(4))
    k = x.numel() // 3
    _, tau = select.sparsify(x, k, "hard")
    assert same_bits(tau, expected_tau(x, k))
    buffer = select._candidate_capacity(x.numel())
    (start, overflowed), (_, copied), *later = lengths_seen
    assert start > buffer and overflowed > buffer and 0 < copied <= buffer
    assert later == [(copied, copied)] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_bytes_in_the_benchmark_note_follow_the_passes(dtype):
    """``sparse_delta_bytes`` against the passes counted by hand: float32 writes ΔW, reads
    it once to copy out C candidates, reads those once, and masks ΔW (4N + 2C entries);
    float64 reads ΔW twice before its copy and reads the candidates 3 times (5N + 4C);
    overflowing candidates cost the buffer (N/8) and one more read of ΔW."""
    from tensor_peft.gpu_report.floors import sparse_delta_bytes

    numel, few = 8000, 200
    if dtype == torch.float32:
        fits, overflowed = 4 * numel + 2 * few, 5 * numel + numel // 8
    else:
        fits, overflowed = 5 * numel + 4 * few, 6 * numel + numel // 8
    assert sparse_delta_bytes(numel, dtype, few) == fits * dtype.itemsize
    assert sparse_delta_bytes(numel, dtype, numel) == overflowed * dtype.itemsize
