"""The CUDA ``matrix_exp`` kernels (csrc/cuda/expm.cu) at the boundaries of their paths, on
``cuda_emulated``: a team of lanes per matrix for n ≤ 16 (1 lane for n = 1, 4 for n = 2,
16 for n = 3–4, a warp from n = 5; several matrices per block, the batch's last block
partly empty), a block per matrix from n = 17, its workspace in shared memory up to the
device's limit (sm_90: 227 KiB, sm_80: 163 KiB) and in global memory past it. Forward and
backward against SciPy, each batch mixing norms (so the matrices sharing a warp or block
take different degrees and squarings) and a NaN matrix; and the race check: a reversed
and a shuffled thread order give the same bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tensor_peft import backends, ops

from .test_matrix_exp import relative_error, with_norm
from .test_reference import _frechet_adjoint_scipy, scipy_expm

pytestmark = pytest.mark.skipif(
    backends.why_unavailable("cuda_emulated", "cpu") is not None,
    reason=f"cuda_emulated: {backends.why_unavailable('cuda_emulated', 'cpu')}",
)

F64 = torch.float64


@pytest.fixture
def emulator():
    from tensor_peft import _cuda_emulated

    yield _cuda_emulated
    _cuda_emulated.set_schedule("forward", 0)
    _cuda_emulated.set_compute_capability(90)


def matrices_per_block(n: int, dtype: torch.dtype) -> int:
    """What the kernel's plan gives, written out here: 128 threads of teams of the next
    power of two ≥ n² lanes (at most 32) within 48 KiB of shared memory; one from n = 17."""
    if n > 16:
        return 1
    team = min(32, 1 << (n * n - 1).bit_length())
    teams = 128 // team
    size = torch.finfo(dtype).bits // 8
    while teams > 1 and teams * (21 * n * n * size + 4 * n) > 48 * 1024:
        teams //= 2
    return teams


def batch_of(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Two blocks' matrices and three more: norms from 1e-3 to 40 in turn (float32: to 4),
    every third a rotation generator (row swaps in the Padé solve), and a NaN one."""
    count = 2 * matrices_per_block(n, dtype) + 3 if n <= 16 else 3
    g = torch.Generator().manual_seed(seed)
    norms = [1e-3, 0.5, 3.0, 40.0] if dtype == F64 else [1e-3, 0.5, 4.0]
    matrices = []
    for k in range(count):
        random = torch.randn(n, n, generator=g, dtype=F64)
        matrices.append(with_norm(random - random.T if k % 3 == 0 else random, norms[k % len(norms)]))
    A = torch.stack(matrices).to(dtype)
    A[1, 0, n - 1] = float("nan")
    return A


def run(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    A = A.clone().requires_grad_()
    with backends.use("cuda_emulated"):
        out = ops.matrix_exp(A)
        (grad,) = torch.autograd.grad(out, A, G)
    return out.detach(), grad


def check(A: torch.Tensor, G: torch.Tensor, out: torch.Tensor, grad: torch.Tensor) -> None:
    finite = torch.ones(A.shape[0], dtype=torch.bool)
    finite[1] = False
    assert torch.isnan(out[1]).all() and torch.isnan(grad[1]).all()
    bound = 1e-11 if A.dtype == F64 else 1e-5
    A64, G64 = A[finite].double(), G[finite].double()
    assert (relative_error(out[finite], scipy_expm(A64)) <= bound).all()
    assert (relative_error(grad[finite], _frechet_adjoint_scipy(A64, G64)) <= bound).all()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16, 17])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_teams_of_lanes_and_blocks_match_scipy_and_agree_across_schedules(emulator, n, dtype):
    A = batch_of(n, dtype, seed=n)
    G = torch.randn(A.shape, generator=torch.Generator().manual_seed(100 + n), dtype=F64).to(dtype)
    out, grad = run(A, G)
    check(A, G, out, grad)
    for order, seed in (("reverse", 0), ("shuffle", 5)):
        emulator.set_schedule(order, seed)
        other_out, other_grad = run(A, G)
        assert torch.equal(other_out.nan_to_num(), out.nan_to_num()), order
        assert torch.equal(other_grad.nan_to_num(), grad.nan_to_num()), order


# Under sm_90 the emulator warns of a launch an sm_80 GPU would refuse: the plan reads the
# device's limit, and the sm_80 cases show that it goes to global memory there instead.
@pytest.mark.filterwarnings("ignore:matrix_exp_backward.*more than sm_80 GPUs allow:RuntimeWarning")
@pytest.mark.parametrize("capability,n,on_chip", [(80, 31, True), (80, 32, False), (90, 32, True), (90, 33, True)])
def test_a_block_per_matrix_in_shared_memory_up_to_the_device_limit_and_global_past_it(
    emulator, capability, n, on_chip
):
    """float64 backward: 21·n² values of 8 bytes; 163 KiB on sm_80 holds n = 31, not 32."""
    emulator.set_compute_capability(capability)
    assert (emulator.matrix_exp_workspace_f64(n=n, backward=True) == 0) == on_chip
    A = batch_of(n, F64, seed=n)
    G = torch.randn(A.shape, generator=torch.Generator().manual_seed(n), dtype=F64)
    out, grad = run(A, G)
    check(A, G, out, grad)
    emulator.set_schedule("shuffle", 3)
    other_out, other_grad = run(A, G)
    assert torch.equal(other_out.nan_to_num(), out.nan_to_num())
    assert torch.equal(other_grad.nan_to_num(), grad.nan_to_num())


@pytest.mark.parametrize("dtype,n,on_chip", [(F64, 37, True), (F64, 38, False), (torch.float32, 52, True),
                                             (torch.float32, 53, False)])  # fmt: skip
def test_global_workspace_only_when_shared_memory_cannot_hold_a_matrix(emulator, dtype, n, on_chip):
    """sm_90's 227 KiB hold the backward's 21·n² values up to n = 37 (float64) or 52 (float32)."""
    workspace = getattr(emulator, {F64: "matrix_exp_workspace_f64", torch.float32: "matrix_exp_workspace_f32"}[dtype])
    assert workspace(n=n, backward=True) == (0 if on_chip else 21 * n * n)
    assert workspace(n=8, backward=True) == 0
