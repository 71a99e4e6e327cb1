"""Backend selection: default order, explicit requests (use() and the environment
variable), and the errors for backends that cannot run."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from tensor_peft import backends, ops
from tensor_peft.backends import BackendUnavailableError, registry


def test_reference_always_runs_and_implements_every_op():
    assert "reference" in backends.available("cpu")
    assert backends.implemented_ops("reference") == registry.OPS


def test_every_registry_op_is_the_torch_library_op_of_the_same_name():
    for op in registry.OPS:
        assert hasattr(torch.ops.tensor_peft, op), op


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
    with pytest.raises(ValueError, match="name must be one of 'reference', 'cpu', 'triton', 'cuda'"):
        with backends.use("numpy"):
            pass


@pytest.mark.parametrize("name", ["cpu", "triton", "cuda", "cuda_emulated"])
def test_asking_for_a_backend_that_cannot_run_raises_with_the_reason(name, monkeypatch):
    """Each op asked of a native backend either runs there or raises saying why
    (not built, no device): never a silent fallback."""
    monkeypatch.setenv(backends.ENV_VAR, name)
    weight = torch.randn(4, 3)
    reason = backends.why_unavailable(name, "cpu")
    if reason is None:
        pytest.skip(f"{name} runs on cpu tensors here")
    with pytest.raises(BackendUnavailableError, match=f"backend '{name}' was asked for") as error:
        ops.matrix_exp(weight[:3])
    assert reason in str(error.value)


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_backend_registers_every_op_as_a_function_of_its_own(name):
    """Each backend has a kernel for each op, none of them the reference's; only triton
    without Triton has none, and says why."""
    implemented = backends.implemented_ops(name)
    if name == "triton" and not implemented:
        assert "triton is not installed or does not load" in backends.why_unavailable("triton")
        return
    assert implemented == registry.OPS
    for op in registry.OPS:
        function = registry.kernel(op, name)
        assert function.__module__.startswith("tensor_peft.backends.")
        assert (function is registry.kernel(op, "reference")) == (name == "reference")


def test_kernel_is_the_registered_function_and_refuses_unknown_names():
    from tensor_peft.backends import reference

    assert registry.kernel("sparsify", "reference") is reference.sparsify
    with pytest.raises(ValueError, match="op must be one of"):
        registry.kernel("kernelized_sparse_linear_backward", "reference")
    with pytest.raises(ValueError, match="name must be one of"):
        registry.kernel("sparsify", "numpy")


def test_op_names_are_the_custom_op_names():
    """Every op of the registry is a ``tensor_peft::`` torch.library op of the same name."""
    for op in registry.OPS:
        assert hasattr(torch.ops.tensor_peft, op), op


@pytest.mark.parametrize(("op", "backend", "message"), [
    ("tucker_mrege", "cpu", "op must be one of 'tucker_delta', "),
    ("kernelized_sparse_linear_backward", "cpu", "op must be one of"),
    ("tucker_merge", "numpy", "backend must be one of 'reference', 'cpu', 'triton', 'cuda', 'cuda_emulated'; got 'numpy'"),
    (None, "cpu", "op must be one of"),
    ("tucker_merge", "cpu", "tucker_merge is already registered for backend 'cpu'"),
])  # fmt: skip
def test_register_refuses_unknown_names_and_a_second_kernel(op, backend, message):
    registry.kernel("tucker_merge", "cpu")  # the cpu kernels registered
    before = dict(registry._KERNELS)
    with pytest.raises(ValueError, match=message):
        registry.register(op, backend)(lambda *args: None)
    assert registry._KERNELS == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU reasons")
def test_reasons_without_gpu():
    assert backends.why_unavailable("cuda", "cpu") == "it runs only on cuda tensors, not cpu"
    reason = backends.why_unavailable("cuda", "cuda")
    assert "torch sees no CUDA device" in reason or "tensor_peft._cuda is not built" in reason
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run here"):
        with backends.use("cuda"):
            pass


def test_cuda_emulated_serves_cpu_tensors_and_says_how_to_build_it(monkeypatch):
    from tensor_peft.backends import cuda_emulated

    assert backends.why_unavailable("cuda_emulated", "cuda") == "it runs only on cpu tensors, not cuda"
    assert "cuda_emulated" not in registry.DEFAULT_ORDER["cpu"]
    monkeypatch.setattr(cuda_emulated.importlib.util, "find_spec", lambda name: None)
    assert "not built (set TENSOR_PEFT_CUDA_EMULATION=1" in cuda_emulated.unavailable_reason("cpu")


def _spy_on(monkeypatch, backend: str, op: str) -> list:
    """Calls of ``op`` on ``backend`` from now on (the registry looks functions up per call)."""
    original, calls = registry.kernel(op, backend), []

    def spy(*args):
        calls.append(op)
        return original(*args)

    monkeypatch.setitem(registry._KERNELS, (op, backend), spy)
    return calls


@pytest.mark.skipif(backends.why_unavailable("cpu", "cpu") is not None, reason="needs a second backend")
def test_backward_runs_on_the_backend_of_its_forward_after_the_block(monkeypatch):
    """The forward ran inside use("reference"); backward, after the block, still runs there
    (not on the default order's cpu backend)."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    reference_calls = _spy_on(monkeypatch, "reference", "matrix_exp_backward")
    cpu_calls = _spy_on(monkeypatch, "cpu", "matrix_exp_backward")
    A = torch.randn(2, 3, 3, requires_grad=True)
    with backends.use("reference"):
        out = ops.matrix_exp(A)
    out.sum().backward()
    assert reference_calls == ["matrix_exp_backward"] and cpu_calls == []


@pytest.mark.skipif(backends.why_unavailable("cpu", "cpu") is not None, reason="needs a second backend")
def test_backward_on_another_thread_runs_on_the_backend_of_its_forward(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    reference_calls = _spy_on(monkeypatch, "reference", "tucker_delta_backward")
    core = torch.randn(2, 3, requires_grad=True)
    factors = [torch.randn(4, 2, requires_grad=True), torch.randn(5, 3, requires_grad=True)]
    with backends.use("reference"):
        out = ops.tucker_delta(core, factors)
        worker = threading.Thread(target=lambda: out.sum().backward())
        worker.start()
        worker.join()
    assert reference_calls == ["tucker_delta_backward"] and core.grad is not None


def test_use_holds_only_in_the_thread_that_entered_it(monkeypatch):
    """use() is per thread: a thread started inside the block selects by the default order."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    seen = {}
    with backends.use("reference"):
        worker = threading.Thread(target=lambda: seen.update(requested=backends.requested()))
        worker.start()
        worker.join()
        assert backends.requested() == "reference"
    assert seen == {"requested": None}


def test_use_in_a_generator_resumed_on_another_thread_ends_cleanly(monkeypatch):
    """A block entered in a generator and left after the generator moved to another
    thread: the exit raises nothing, and the request ends in the thread that entered it
    (as if the block had ended there), while an enclosing request holds again."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)

    def steps():
        with backends.use("reference"):
            yield backends.requested()
            yield backends.requested()

    outcome = {}

    def finish(generator):
        try:
            outcome["rest"] = list(generator)
        except BaseException as error:  # noqa: BLE001 - reported to the test's thread
            outcome["error"] = error

    for enclosing in (None, "reference"):
        with contextlib.ExitStack() as stack:
            if enclosing is not None:
                stack.enter_context(backends.use(enclosing))
            generator = steps()
            assert next(generator) == "reference"
            worker = threading.Thread(target=finish, args=(generator,))
            worker.start()
            worker.join()
            assert "error" not in outcome, outcome.get("error")
            assert outcome["rest"] == [None]  # the other thread's context never held the request
            assert backends.requested() == enclosing
        assert backends.requested() is None
