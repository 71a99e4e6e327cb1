"""The Triton launchers checked without a GPU and without compiling: each kernel's argument
names against the locals of Triton's launch binder, grids for huge shapes on ``meta``
tensors, no host-device synchronization in a SNELL forward, and the refusal of
float-atomic backward kernels under ``torch.use_deterministic_algorithms(True)``."""

from __future__ import annotations

import inspect

import pytest
import torch

triton = pytest.importorskip("triton")

from tensor_peft.backends import determinism, registry  # noqa: E402
from tensor_peft.backends.kernelized_ops import KernelProblem  # noqa: E402
from tensor_peft.backends.triton import expm, kernelized, lowrank, select  # noqa: E402
from tensor_peft.gpu_report.triton_aot import GRID_LIMITS, recording_launches  # noqa: E402

KERNELS = [value for module in (expm, kernelized, lowrank, select) for value in vars(module).values()
           if hasattr(value, "fn") and hasattr(value, "arg_names") and value.fn.__module__ == module.__name__]  # fmt: skip
META = torch.device("meta")


def triton_op(op: str):
    """The triton backend's function for ``op``."""
    return registry.kernel(op, "triton")


def binder_locals() -> set[str]:
    """The local names of the function Triton's launch binder generates (for a kernel with
    one argument ``x``): an argument of the same name would be shadowed by it."""
    from triton.runtime.jit import JITFunction, create_function_from_signature

    def probe(x):
        pass

    jit = JITFunction(probe)
    binder = create_function_from_signature(jit.signature, jit.params, None)
    code = binder.__code__
    return set(code.co_varnames[code.co_argcount + code.co_kwonlyargcount:]) - {"options"}


def test_binder_has_locals_to_check_against():
    assert "specialization" in binder_locals()


@pytest.mark.parametrize("kernel", KERNELS, ids=[f"{k.fn.__module__.rsplit('.', 1)[-1]}.{k.fn.__name__}" for k in KERNELS])
def test_no_kernel_argument_is_shadowed_by_the_launch_binder(kernel):
    names = set(inspect.signature(kernel.fn).parameters)
    assert not names & binder_locals(), f"{kernel.fn.__name__}: rename {sorted(names & binder_locals())}"


def empty(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device=META)


def huge_calls():
    """Launchers at sizes past every grid dimension's 65,535 but x."""
    wide = 5_000_000  # columns: 78,125 tiles of 64, 156,250 of 32
    yield "tucker_merge", lambda: triton_op("tucker_merge")(
        empty(64, wide), empty(8, 8), [empty(64, 8), empty(wide, 8)], 0.5
    )
    yield "tucker_delta_backward", lambda: triton_op("tucker_delta_backward")(
        empty(64, wide), empty(8, 8), [empty(64, 8), empty(wide, 8)], 0.5
    )
    yield "kernelized_sparse_delta", lambda: kernelized.kernelized_sparse_delta(
        KernelProblem(empty(2, 64, 4), empty(2, wide, 4), "mixture", empty(2), empty(3), 1e-6, "hard"), 1000
    )
    yield "kernelized_delta_backward", lambda: kernelized.kernelized_sparse_delta_backward(
        empty(64, wide), KernelProblem(empty(2, 64, 4), empty(2, wide, 4), "rbf", empty(2), empty(3), 1e-6), None
    )
    yield "matrix_exp", lambda: expm.matrix_exp(empty(100_000, 8, 8))


@pytest.mark.parametrize("name,call", list(huge_calls()), ids=[name for name, _ in huge_calls()])
def test_grids_stay_within_cuda_limits(name, call):
    with recording_launches() as launches:
        call()
    assert launches
    for launch in launches:
        grid = (*launch.grid, 1, 1)[:3]
        assert all(size <= limit for size, limit in zip(grid, GRID_LIMITS)), (launch.kernel, grid)


def test_snell_forward_copies_nothing_from_the_host(monkeypatch):
    """A SNELL forward with a threshold on meta tensors: a read on the host (.item(), .cpu())
    would fail there, and no tensor is built from host data on the device."""
    built = []
    original = torch.tensor

    def tensor(*args, **kwargs):
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
            built.append(kwargs["device"])
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    with recording_launches() as launches:
        kernelized.kernelized_sparse_delta(
            KernelProblem(empty(2, 96, 4), empty(2, 80, 4), "mixture", empty(2), empty(3), 1e-6, "soft"), 100
        )
        select.sparsify(empty(96, 80), 100, "hard")
    assert launches and not built


def backward_calls():
    yield "tucker_delta_backward", lambda: triton_op("tucker_delta_backward")(
        empty(64, 48), empty(8, 8), [empty(64, 8), empty(48, 8)], 0.5
    )
    yield "lowrank_hadamard_merge_backward", lambda: triton_op("lowrank_hadamard_merge_backward")(
        empty(64, 48), empty(64, 48), empty(64, 8), empty(8, 48), 0.5, "exact"
    )
    dense = KernelProblem(empty(2, 64, 4), empty(2, 48, 4), "rbf", empty(2), empty(3), 1e-6)
    yield "kernelized_delta_backward", lambda: kernelized.kernelized_sparse_delta_backward(empty(64, 48), dense, None)
    yield "kernelized_sparse_delta_backward", lambda: kernelized.kernelized_sparse_delta_backward(
        empty(64, 48), dense._replace(mode="hard"), empty()
    )


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.mark.parametrize("name,call", list(backward_calls()), ids=[name for name, _ in backward_calls()])
def test_float_atomic_kernels_refuse_deterministic_mode(name, call, deterministic):
    assert name in determinism.NONDETERMINISTIC
    with recording_launches() as launches:
        call()  # allowed by default
        assert launches
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match=f"{name} on the triton backend .*reference"):
            call()
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match=name):
            call()


def test_deterministic_ops_still_run_in_deterministic_mode(deterministic):
    torch.use_deterministic_algorithms(True)
    with recording_launches() as launches:
        triton_op("tucker_merge")(empty(64, 48), empty(8, 8), [empty(64, 8), empty(48, 8)], 0.5)
        expm.matrix_exp_backward(empty(4, 8, 8), empty(4, 8, 8))
        select.sparsify(empty(96, 80), 100, "hard")
    assert launches


def test_cuda_float_atomic_launchers_refuse_deterministic_mode(deterministic):
    """The cuda backend checks before it reaches the extension (not loaded here)."""
    torch.use_deterministic_algorithms(True)
    dense = KernelProblem(empty(2, 64, 4), empty(2, 48, 4), "rbf", empty(2), empty(3), 1e-6)
    grad, U, R = empty(64, 48), empty(64, 8), empty(8, 48)
    with pytest.raises(RuntimeError, match="tucker_delta_backward on the cuda backend"):
        registry.kernel("tucker_delta_backward", "cuda")(grad, empty(8, 8), [U, empty(48, 8)], 0.5)
    with pytest.raises(RuntimeError, match="lowrank_hadamard_merge_backward on the cuda backend"):
        registry.kernel("lowrank_hadamard_merge_backward", "cuda")(grad, grad, U, R, 0.5, "taylor1")
    with pytest.raises(RuntimeError, match="kernelized_sparse_delta_backward on the cuda backend"):
        registry.kernel("kernelized_sparse_delta_backward", "cuda")(grad, dense._replace(mode="hard"), empty())
    with pytest.raises(RuntimeError, match="kernelized_delta_backward on the cuda backend"):
        registry.kernel("kernelized_sparse_delta_backward", "cuda")(grad, dense, None)
