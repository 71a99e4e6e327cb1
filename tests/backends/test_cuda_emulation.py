"""The CUDA emulator of the ``cuda_emulated`` backend (csrc/cuda/emulation.h): launch
limits refused naming the kernel, barriers and shuffles as CUDA defines them, misuse
detected, and the race check: every op of the op table gives the same results when a
block's threads and the grid's blocks run in another order (bit for bit, within a
tolerance only for the gradients summed with float atomics)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from tensor_peft import backends

from ..ops.cases import BLOCK_CASES, CASES, Case

pytestmark = pytest.mark.skipif(
    backends.why_unavailable("cuda_emulated", "cpu") is not None,
    reason=f"cuda_emulated: {backends.why_unavailable('cuda_emulated', 'cpu')}",
)


@contextlib.contextmanager
def schedule(emulator, order: str, seed: int = 0):
    emulator.set_schedule(order, seed)
    try:
        yield
    finally:
        emulator.set_schedule("forward", 0)


@pytest.mark.parametrize(("grid", "block", "shared", "message"), [
    ((1, 1, 1), (1025, 1, 1), 0, r"a block of 1025×1×1 threads"),
    ((1, 1, 1), (32, 32, 2), 0, r"a block of 32×32×2 threads"),
    ((1, 1, 1), (1, 1, 65), 0, r"a block of 1×1×65 threads"),
    ((1, 1, 1), (0, 1, 1), 0, r"a block of 0×1×1 threads"),
    ((2**31, 1, 1), (1, 1, 1), 0, r"a grid of 2147483648×1×1 blocks"),
    ((1, 65536, 1), (1, 1, 1), 0, r"a grid of 1×65536×1 blocks"),
    ((1, 1, 65536), (1, 1, 1), 0, r"a grid of 1×1×65536 blocks"),
    ((0, 1, 1), (1, 1, 1), 0, r"a grid of 0×1×1 blocks"),
    ((1, 1, 1), (1, 1, 1), 48 * 1024 + 1, r"49153 bytes of dynamic shared memory, more than the 49152"),
])  # fmt: skip
def test_launches_a_gpu_refuses_raise_naming_the_kernel(emulator, grid, block, shared, message):
    emulator.checks.launch_empty((1, 1, 1), (1, 1, 1), 0, allowed=48 * 1024)  # no opt-in left by another test
    with pytest.raises(ValueError, match="^empty_kernel: " + message):
        emulator.checks.launch_empty(grid, block, shared)


def test_shared_memory_past_48_kib_needs_the_opt_in_up_to_the_device_limit(emulator):
    checks = emulator.checks
    checks.launch_empty((2, 1, 1), (1024, 1, 1), 100_000, allowed=100_000)  # within what it was allowed
    with pytest.raises(ValueError, match="^empty_kernel: 100001 bytes .* more than the 100000 it was allowed"):
        checks.launch_empty((1, 1, 1), (1, 1, 1), 100_001)
    with pytest.warns(RuntimeWarning, match="empty_kernel: 232448 bytes .* more than sm_80 GPUs allow"):
        checks.launch_empty((1, 1, 1), (1, 1, 1), 227 * 1024, allowed=227 * 1024)  # sm_90's limit
    with pytest.raises(ValueError, match="cudaFuncSetAttribute refused 232449 bytes"):
        checks.launch_empty((1, 1, 1), (1, 1, 1), 227 * 1024 + 1, allowed=227 * 1024 + 1)
    emulator.set_compute_capability(80)
    with pytest.raises(ValueError, match="cudaFuncSetAttribute refused 166913 bytes"):
        checks.launch_empty((1, 1, 1), (1, 1, 1), 163 * 1024 + 1, allowed=163 * 1024 + 1)


def _lowrank_forward(emulator, rank: int, rows: int = 2, columns: int = 3, dtype=torch.float64):
    """lowrank_forward's kernel (a tile of U's rows and R's columns in shared memory per
    step of the rank), against torch."""
    g = torch.Generator().manual_seed(rank)
    U, R = torch.randn(rows, rank, generator=g, dtype=dtype), torch.randn(rank, columns, generator=g, dtype=dtype)
    out = torch.empty(rows, columns, dtype=dtype)
    emulator.lowrank_forward_f64(
        out=out.data_ptr(), weight=0, U=U.data_ptr(), R=R.data_ptr(), d0=rows, r0=rank, n=columns, scale=0.5,
        epilogue=0, stream=0,
    )  # fmt: skip
    torch.testing.assert_close(out, 0.5 * U @ R)


@pytest.mark.parametrize("capability", [80, 90])
def test_a_large_rank_takes_the_same_shared_memory_on_every_device(emulator, capability):
    """The forward steps through the rank: 25000 (200000 bytes of float64 per row of U,
    more than sm_80 lets a block hold) runs with no opt-in, on sm_80 as on sm_90."""
    emulator.set_compute_capability(capability)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _lowrank_forward(emulator, 25_000)


@pytest.mark.parametrize(("rank", "rows", "columns"), [(1, 1, 1), (31, 33, 65), (33, 70, 40), (64, 32, 32)])
def test_lowrank_forward_tiles_cover_partial_tiles_and_rank_steps(emulator, rank, rows, columns):
    _lowrank_forward(emulator, rank, rows, columns)


def test_divergent_barrier_raises_naming_the_kernel(emulator):
    out = torch.zeros(64, dtype=torch.int32)
    message = r"^divergent_barrier_kernel: .* at the __syncthreads of emulation_checks.cu:\d+.*divergent"
    with pytest.raises(RuntimeError, match=message):
        emulator.checks.divergent_barrier(out.data_ptr(), 64)


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize(("threads", "exited", "message"), [
    (32, 3, "lane 3 of the mask has exited|for lanes that never arrive"),
    (32, 31, "lane 31 of the mask has exited|for lanes that never arrive"),
    (20, -1, "the mask names lanes past the block's last thread"),
])  # fmt: skip
def test_shuffle_with_a_lane_exited_or_absent_raises(emulator, order, threads, exited, message):
    out = torch.zeros(threads)
    with schedule(emulator, order), pytest.raises(RuntimeError, match=f"^exited_lane_kernel: .*({message})"):
        emulator.checks.exited_lane(out.data_ptr(), threads, exited)


def _shuffles(x: list[float], mask: int, delta: int, width: int) -> list[list[float]]:
    """CUDA's definition of shfl, shfl_up, shfl_down and shfl_xor for the lanes of mask
    (the others left 0), within segments of ``width`` lanes."""
    lanes = len(x)
    out = [[0.0] * lanes for _ in range(4)]
    for lane in range(lanes):
        if not mask >> lane & 1:
            continue
        base = lane // width * width
        out[0][lane] = x[base + delta % width]
        out[1][lane] = x[lane - delta] if lane - base >= delta else x[lane]
        out[2][lane] = x[lane + delta] if lane - base + delta < width else x[lane]
        source = lane ^ delta
        out[3][lane] = x[source] if source // width == lane // width else x[lane]
    return out


@pytest.mark.parametrize(("lanes", "mask", "delta", "width"), [
    (32, 0xFFFFFFFF, 1, 32), (32, 0xFFFFFFFF, 5, 32), (32, 0xFFFFFFFF, 3, 8), (32, 0x0000FFFF, 2, 16),
    (16, 0x0000FFFF, 4, 16),
])  # fmt: skip
def test_shuffles_read_the_lanes_cuda_defines(emulator, lanes, mask, delta, width):
    x = torch.randn(lanes, dtype=torch.float64)
    out = torch.zeros(4, lanes, dtype=torch.float64)
    for order in ("forward", "reverse", "shuffle"):
        out.zero_()
        with schedule(emulator, order, seed=3):
            emulator.checks.shuffle(x.data_ptr(), out.data_ptr(), lanes, mask, delta, width)
        expected = torch.tensor(_shuffles(x.tolist(), mask, delta, width), dtype=torch.float64)
        assert torch.equal(out, expected), order


@pytest.mark.parametrize("tile", [4, 16])
def test_tiles_of_a_warp_synchronize_apart(emulator, tile):
    """Tiles of one warp at __syncwarp on their own masks, each for its own number of
    rounds (CUDA allows it: lanes of disjoint masks need not meet), in every order."""
    lanes = torch.arange(32)
    first = lanes // tile * tile
    neighbour = first + (lanes - first + 1) % tile
    rounds = lanes // tile + 1
    expected = (100 * rounds * (rounds - 1) // 2 + rounds * neighbour).to(torch.int32)
    for order in ("forward", "reverse", "shuffle"):
        out = torch.zeros(32, dtype=torch.int32)
        with schedule(emulator, order, seed=2):
            emulator.checks.tiles(out.data_ptr(), tile, False)
        assert torch.equal(out, expected), order


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
def test_lanes_at_overlapping_masks_raise(emulator, order):
    out = torch.zeros(32, dtype=torch.int32)
    message = "different warp operations or masks|for lanes that never arrive|of the mask has exited"
    with schedule(emulator, order, seed=2), pytest.raises(RuntimeError, match=f"^tiles_kernel: .*({message})"):
        emulator.checks.tiles(out.data_ptr(), 16, True)


def test_a_missing_barrier_is_a_race_the_schedules_expose(emulator):
    blocks, threads = 3, 96
    t, b = torch.arange(threads), torch.arange(blocks)
    expected = (7 * ((t + 1) % threads) + b[:, None]).flatten().to(torch.int32)
    results = {}
    for synchronize in (True, False):
        for order in ("forward", "reverse", "shuffle"):
            out = torch.zeros(blocks * threads, dtype=torch.int32)
            with schedule(emulator, order, seed=1):
                emulator.checks.neighbour(out.data_ptr(), blocks, threads, synchronize)
            results[synchronize, order] = out
    for order in ("forward", "reverse", "shuffle"):
        assert torch.equal(results[True, order], expected)
    assert not torch.equal(results[False, "forward"], results[False, "reverse"])
    assert any(not torch.equal(results[False, order], expected) for order in ("forward", "reverse", "shuffle"))


def test_set_schedule_refuses_unknown_orders(emulator):
    with pytest.raises(ValueError, match="order must be 'forward', 'reverse' or 'shuffle', got 'random'"):
        emulator.set_schedule("random", 0)
    with pytest.raises(ValueError, match="capability must be 80 or 90, got 75"):
        emulator.set_compute_capability(75)


def _run(case: Case, dtype: torch.dtype):
    """The op's output and gradients on cuda_emulated, from fixed inputs."""
    args, kwargs = case.make(dtype, "cpu", torch.Generator().manual_seed(5))
    inputs = [t for a in [*args, *kwargs.values()] for t in (a if isinstance(a, list) else [a])
              if isinstance(t, torch.Tensor) and t.requires_grad]  # fmt: skip
    with backends.use("cuda_emulated"):
        out = case.op(*args, **kwargs)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=dtype)
        grads = torch.autograd.grad(out, inputs, upstream)
    return out, grads


# Ops whose backward adds floats atomically: the order of the additions is free.
_FLOAT_ATOMIC_BACKWARD = ("tucker", "kernelized", "sparse-", "hadamard")


@pytest.mark.parametrize("case", CASES + BLOCK_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_every_op_agrees_across_schedules(emulator, case, dtype):
    """The race check: reversed and shuffled runs give the forward run's results."""
    out, grads = _run(case, dtype)
    atomic = case.id.startswith(_FLOAT_ATOMIC_BACKWARD)
    for order, seed in (("reverse", 0), ("shuffle", 11)):
        with schedule(emulator, order, seed):
            other_out, other_grads = _run(case, dtype)
        assert torch.equal(out, other_out), order
        for grad, other in zip(grads, other_grads):
            if atomic:  # rounding of sums in another order, relative to the gradient's size
                eps = torch.finfo(dtype).eps
                torch.testing.assert_close(other, grad, rtol=64 * eps, atol=64 * eps * float(grad.abs().max()))
            else:
                assert torch.equal(grad, other), order
