"""``determinism.check_deterministic`` refuses exactly the ops that sum with float atomics,
and only on the backends whose kernels do (the GPU ones)."""

from __future__ import annotations

import pytest
import torch

from tensor_peft.backends.determinism import check_deterministic


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.mark.parametrize("backend", ["triton", "cuda", "cuda_emulated"])
@pytest.mark.parametrize("op", ["tucker_delta_backward", "lowrank_hadamard_merge_backward", "kernelized_delta_backward",
                                "kernelized_sparse_delta_backward", "sparse_linear_backward"])  # fmt: skip
def test_float_atomic_ops_are_refused_on_the_gpu_backends(op, backend, deterministic):
    with pytest.raises(RuntimeError, match=f"{op} on the {backend} backend sums with float atomics"):
        check_deterministic(op, backend)


@pytest.mark.parametrize("op,backend", [("matrix_exp_backward", "cuda"), ("sparsify_backward", "triton"),
                                        ("tucker_merge", "cuda_emulated"), ("tucker_delta_backward", "cpu"),
                                        ("kernelized_sparse_delta_backward", "reference")])  # fmt: skip
def test_deterministic_ops_and_backends_pass(op, backend, deterministic):
    check_deterministic(op, backend)
