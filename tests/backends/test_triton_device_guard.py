"""Every Triton launch runs on its tensors' device, not on the current one (a layer of a
model spread over two GPUs lives on cuda:1 while GPU 0 is current). No GPU here: the
op's tensors are ``meta`` tensors that report ``cuda:1`` to Python (where a launcher
reads a device), ``torch.cuda.device`` records the device it makes current, and each
launch records which device was current when it was made."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytest.importorskip("triton")

from tensor_peft.backends import registry  # noqa: E402
from tensor_peft.backends.kernelized_ops import KernelProblem  # noqa: E402
from tensor_peft.backends.triton import expm, kernelized, select, shared  # noqa: E402

CLAIMED = torch.device("cuda:1")
META = torch.device("meta")


class MetaClaimingCuda1(TorchFunctionMode):
    """Meta tensors say they are on cuda:1; tensors asked for on cuda:1 are made on meta."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == torch.Tensor.device.__get__:
            device = func(*args, **kwargs)
            return CLAIMED if device == META else device
        if "device" in kwargs and torch.device(kwargs["device"]) == CLAIMED:
            kwargs["device"] = META
        return func(*args, **kwargs)


def empty(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device=META)


def op_calls():
    triton_op = lambda op: registry.kernel(op, "triton")  # noqa: E731
    U, R, grad = empty(64, 8), empty(8, 48), empty(64, 48)
    yield "tucker_merge", lambda: triton_op("tucker_merge")(grad, empty(8, 8), [U, empty(48, 8)], 0.5)
    yield "tucker_delta_backward", lambda: triton_op("tucker_delta_backward")(grad, empty(8, 8), [U, empty(48, 8)], 0.5)
    yield "lowrank_hadamard_merge", lambda: triton_op("lowrank_hadamard_merge")(grad, U, R, 0.5, "exact")
    yield "matrix_exp_backward", lambda: expm.matrix_exp_backward(empty(4, 8, 8), empty(4, 8, 8))
    out_emb, in_emb, coeff, params = empty(2, 64, 4), empty(2, 48, 4), empty(2), empty(3)
    problem = KernelProblem(out_emb, in_emb, "mixture", coeff, params, 1e-6, "soft")
    yield "kernelized_sparse_delta", lambda: kernelized.kernelized_sparse_delta(problem, 100)
    yield "kernelized_sparse_delta_backward", lambda: kernelized.kernelized_sparse_delta_backward(
        grad, problem._replace(mode="hard"), empty()
    )
    yield "sparsify_backward", lambda: select.sparsify_backward(grad, grad, empty(), "soft")


@pytest.mark.parametrize("name,call", list(op_calls()), ids=[name for name, _ in op_calls()])
def test_every_launch_runs_on_its_tensors_device(name, call, monkeypatch):
    from triton.runtime import interpreter, jit

    current = [torch.device("cuda:0")]
    launched_on = []

    @contextlib.contextmanager
    def making_current(device):
        current.append(torch.device(device))
        yield
        current.pop()

    def record(self, *args, grid, warmup, **kwargs):
        launched_on.append((self.fn.__name__, current[-1]))

    monkeypatch.setattr(torch.cuda, "device", making_current)
    for kind in (jit.JITFunction, interpreter.InterpretedFunction):
        monkeypatch.setattr(kind, "run", record)
    with MetaClaimingCuda1():
        call()
    assert launched_on
    assert all(device == CLAIMED for _, device in launched_on), launched_on


def test_a_launch_over_tensors_on_two_devices_is_refused():
    x = torch.empty(4)
    with pytest.raises(ValueError, match="mask_kernel: its tensors must be on one device"):
        shared.launch(select.mask_kernel, (1,), x, x.to(META), x, 4, x, MODE=0, BACKWARD=False, BLOCK=4)
