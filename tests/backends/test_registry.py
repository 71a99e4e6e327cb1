"""Backend selection: default order, explicit requests (use() and the environment
variable), and the errors for backends that cannot run."""

from __future__ import annotations

import pytest
import torch

from tensor_peft import backends, ops
from tensor_peft.backends import BackendUnavailableError, registry


def test_reference_always_runs_and_implements_every_op():
    assert "reference" in backends.available("cpu")
    assert backends.implemented_ops("reference") == registry.OPS


def test_default_order_on_cpu_picks_the_first_backend_that_implements_the_op():
    for op in registry.OPS:
        name, _ = registry.select(op, "cpu")
        expected = next(
            b for b in registry.DEFAULT_ORDER["cpu"]
            if backends.why_unavailable(b, "cpu") is None and op in backends.implemented_ops(b)
        )  # fmt: skip
        assert name == expected


def test_use_selects_and_restores(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.requested() is None
    with backends.use("reference"):
        assert backends.requested() == "reference"
        assert registry.select("matrix_exp", "cpu")[0] == "reference"
    assert backends.requested() is None


def test_environment_variable_selects(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert registry.select("sparsify", "cpu")[0] == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="environment variable TENSOR_PEFT_BACKEND must be one of"):
        registry.select("sparsify", "cpu")


def test_use_overrides_environment_variable(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with backends.use("reference"):
        assert registry.select("sparsify", "cpu")[0] == "reference"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="name must be one of reference, cpu, triton, cuda"):
        with backends.use("numpy"):
            pass


@pytest.mark.parametrize("name", ["cpu", "triton", "cuda"])
def test_asking_for_a_backend_that_cannot_run_raises_with_the_reason(name, monkeypatch):
    """Each op asked of a native backend either runs there or raises saying why
    (not built, no device, or no kernel yet): never a silent fallback."""
    monkeypatch.setenv(backends.ENV_VAR, name)
    weight = torch.randn(4, 3)
    reason = backends.why_unavailable(name, "cpu")
    if reason is None and "matrix_exp" in backends.implemented_ops(name):
        pytest.skip(f"{name} runs matrix_exp on cpu tensors here")
    expected = reason if reason is not None else "does not implement matrix_exp yet"
    with pytest.raises(BackendUnavailableError, match=f"backend '{name}' was asked for") as error:
        ops.matrix_exp(weight[:3])
    assert expected in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU reasons")
def test_reasons_without_gpu():
    assert backends.why_unavailable("cuda", "cpu") == "it runs only on cuda tensors, not cpu"
    reason = backends.why_unavailable("cuda", "cuda")
    assert "torch sees no CUDA device" in reason or "tensor_peft._cuda is not built" in reason
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run here"):
        with backends.use("cuda"):
            pass
