"""No input takes the process down (issue 15, items 2 and 14): the raw functions of the
cpu extension ``_C`` check their pointers and sizes (ValueError naming the argument), a
C++ exception inside their OpenMP regions comes back as a Python exception, the cpu
backend checks sizes its kernels cannot hold before calling them, and the inputs that
aborted the process give an ordinary result. Calls that could abort run in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tensor_peft import backends
from tensor_peft.backends.kernelized_ops import KernelProblem

pytestmark = pytest.mark.skipif(backends.why_unavailable("cpu", "cpu") is not None, reason="no cpu backend here")


def _extension():
    from tensor_peft import _C

    return _C


def _buffer(count: int) -> torch.Tensor:
    return torch.zeros(max(count, 1), dtype=torch.float32)


def _raw_calls():
    """(label, call, message) for bad raw calls; buffers hold enough for the sizes given."""
    C = _extension()
    x = _buffer(64)
    p = x.data_ptr()
    params = torch.tensor([1.0, 1.0, 1.0]).data_ptr()
    forward = lambda **kw: C.kernelized_forward_f32(  # noqa: E731
        kw.get("out", p), kw.get("emb", p), p, kw.get("rows", 2), kw.get("n", 2), 1, 1, kw.get("kernel", 0),
        kw.get("coeff", p), kw.get("params", params), 0.0, kw.get("k", 0), kw.get("mode", 0), 0.0,
    )  # fmt: skip
    return [
        ("lowrank-null-out", lambda: C.lowrank_forward_f32(0, 0, p, p, 2, 2, 2, 1.0, 0), "out is a null pointer"),
        ("lowrank-null-U", lambda: C.lowrank_backward_f32(p, 0, 0, p, 2, 2, 2, 1.0, 0, p, p), "U is a null pointer"),
        ("lowrank-null-weight-exp", lambda: C.lowrank_forward_f32(p, 0, p, p, 2, 2, 2, 1.0, 1), "weight is a null"),
        ("lowrank-negative-d0", lambda: C.lowrank_forward_f32(p, 0, p, p, -1, 2, 2, 1.0, 0), "d0 must be non-negative"),
        ("lowrank-epilogue", lambda: C.lowrank_forward_f32(p, p, p, p, 2, 2, 2, 1.0, 7), r"epilogue must be in \[0, 2\]"),
        ("lowrank-overflow", lambda: C.lowrank_forward_f32(p, 0, p, p, 2**40, 2, 2**40, 1.0, 0), "overflows 64 bits"),
        ("lowrank-misaligned", lambda: C.lowrank_forward_f32(p + 1, 0, p, p, 2, 2, 2, 1.0, 0), "out is not aligned"),
        ("expm-null", lambda: C.matrix_exp_f32(p, 0, 2, 3), "A is a null pointer"),
        ("expm-negative-batch", lambda: C.matrix_exp_f32(p, p, -2, 3), "batch must be non-negative"),
        ("expm-negative-n", lambda: C.matrix_exp_backward_f64(p, p, p, 1, -3), "n must be non-negative"),
        ("expm-n-near-2^31", lambda: C.matrix_exp_f32(p, p, 0, 2**31 + 5), "n must be at most 46340"),
        ("kernelized-null-out", lambda: forward(out=0), "out is a null pointer"),
        ("kernelized-null-params", lambda: forward(params=0), "params is a null pointer"),
        ("kernelized-negative-rows", lambda: forward(rows=-1), "rows must be non-negative"),
        ("kernelized-kernel", lambda: forward(kernel=9), r"kernel must be in \[0, 4\]"),
        ("kernelized-mode", lambda: forward(mode=-1), r"mode must be in \[0, 2\]"),
        ("kernelized-k", lambda: forward(k=5, mode=1), "k must be at most 4"),
        ("kernelized-n-near-2^31", lambda: C.sparse_linear_backward_f32(
            grad_out=p, input=p, tokens=0, out_emb=p, in_t=p, rows=1, n=2**31, chunks=1, width=1, kernel=0, coeff=p,
            params=params, eps=0.0, tau=0.0, mode=1, d_out_emb=p, d_in_t=p, d_coeff=p, d_params=p,
        ), "n must be at most 2147483647"),
        ("kernelized-backward-delta-unsparsified", lambda: C.kernelized_backward_f32(
            grad=p, out_emb=p, in_t=p, rows=2, n=2, chunks=1, width=1, kernel=0, coeff=p, params=params, eps=0.0,
            tau=0.0, mode=0, d_out_emb=p, d_in_t=p, d_coeff=p, d_params=p, delta=p,
        ), "delta: only a sparsified ΔW"),
        ("kernelized-backward-misaligned-delta", lambda: C.kernelized_backward_f32(
            grad=p, out_emb=p, in_t=p, rows=2, n=2, chunks=1, width=1, kernel=0, coeff=p, params=params, eps=0.0,
            tau=0.0, mode=1, d_out_emb=p, d_in_t=p, d_coeff=p, d_params=p, delta=p + 1,
        ), "delta is not aligned"),
        ("kernelized-backward-weight-without-delta", lambda: C.kernelized_backward_f32(
            grad=p, out_emb=p, in_t=p, rows=2, n=2, chunks=1, width=1, kernel=0, coeff=p, params=params, eps=0.0,
            tau=0.0, mode=1, d_out_emb=p, d_in_t=p, d_coeff=p, d_params=p, weight=p, weight_stride=2,
        ), "weight: W0 is only read to write W0 \\+ ΔW into a delta"),
        ("kernelized-backward-weight-stride", lambda: C.sparse_linear_backward_f32(
            grad_out=p, input=p, tokens=0, out_emb=p, in_t=p, rows=2, n=3, chunks=1, width=1, kernel=0, coeff=p,
            params=params, eps=0.0, tau=0.0, mode=1, d_out_emb=p, d_in_t=p, d_coeff=p, d_params=p, delta=p, weight=p,
            weight_stride=2,
        ), "weight_stride must be at least 3, got 2"),
        ("sparsify-null", lambda: C.sparsify_f64(p, 0, 4, 1, 1), "delta is a null pointer"),
        ("sparsify-negative-count", lambda: C.sparsify_f32(p, p, -4, 0, 1), "count must be non-negative"),
        ("sparsify-mode", lambda: C.sparsify_backward_f32(p, p, p, 4, 0.0, 0), r"mode must be in \[1, 2\]"),
        ("threads", lambda: C.set_max_threads(0), "count must be at least 1"),
    ]  # fmt: skip


RAW_LABELS = [
    "lowrank-null-out", "lowrank-null-U", "lowrank-null-weight-exp", "lowrank-negative-d0", "lowrank-epilogue",
    "lowrank-overflow", "lowrank-misaligned", "expm-null", "expm-negative-batch", "expm-negative-n",
    "expm-n-near-2^31", "kernelized-null-out", "kernelized-null-params", "kernelized-negative-rows",
    "kernelized-kernel", "kernelized-mode", "kernelized-k", "kernelized-n-near-2^31",
    "kernelized-backward-delta-unsparsified", "kernelized-backward-misaligned-delta",
    "kernelized-backward-weight-without-delta", "kernelized-backward-weight-stride", "sparsify-null",
    "sparsify-negative-count", "sparsify-mode", "threads",
]  # fmt: skip


@pytest.mark.parametrize("label", RAW_LABELS)
def test_raw_extension_functions_reject_bad_pointers_and_sizes(label):
    (call, message), = [(c, m) for name, c, m in _raw_calls() if name == label]
    with pytest.raises(ValueError, match=message):
        call()


def test_empty_sizes_accept_null_pointers():
    """An empty tensor may have a null address: with nothing to read, null is fine."""
    C = _extension()
    C.matrix_exp_f32(0, 0, 0, 3)
    C.lowrank_backward_f64(0, 0, 0, 0, 0, 0, 0, 1.0, 0, 0, 0)
    assert C.sparsify_f32(0, 0, 0, 0, 2) == float("-inf")


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_inputs_that_aborted_the_process_now_return():
    """The two inputs of the issue (exit 134, std::bad_alloc) give empty results."""
    result = _run_python("""
        import torch
        from tensor_peft import backends, ops
        with backends.use("cpu"):
            a = ops.matrix_exp(torch.empty(0, 20000, 20000))
            d = ops.kernelized_delta(torch.empty(2, 0, 0), torch.empty(2, 10**10, 0))
        print(tuple(a.shape), tuple(d.shape))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "(0, 20000, 20000) (0, 10000000000)"


def test_a_failed_allocation_inside_a_kernel_raises_memory_error():
    """A workspace too large to allocate, asked for inside the OpenMP region (a matrix of
    the largest n: ~300 GB of workspace), comes back as MemoryError, not an abort. The
    allocation fails before A is read, so a small buffer stands in for it."""
    result = _run_python("""
        import torch
        from tensor_peft import _C
        buffer = torch.zeros(8, dtype=torch.float64)
        try:
            _C.matrix_exp_f64(buffer.data_ptr(), buffer.data_ptr(), 1, 46340)
        except MemoryError:
            print("MemoryError")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MemoryError"


def test_cpu_backend_checks_sizes_before_the_kernel():
    """A stride-0 view stands for a matrix too large for the kernel: the backend refuses it
    with a ValueError naming the argument before allocating anything."""
    from tensor_peft.backends import cpu

    huge = torch.zeros(1).expand(1, 46341, 46341)
    with pytest.raises(ValueError, match="A: the cpu backend's matrix_exp takes n ≤ 46340"):
        cpu.matrix_exp(huge)
    with pytest.raises(ValueError, match="A: the cpu backend's matrix_exp takes n ≤ 46340"):
        cpu.matrix_exp_backward(huge, huge)


def test_cpu_sampled_backward_checks_the_column_count_before_the_kernel(monkeypatch):
    """The sampled backward keeps each kept entry's column in 32 bits: 2³¹ columns (a
    stride-0 view, nothing allocated) are refused with a ValueError naming in_emb."""
    from tensor_peft.backends import cpu

    monkeypatch.setattr(cpu, "_SAMPLED_MIN_TOKENS", 1)

    n = 2**31
    in_emb, x = torch.zeros(1, 1, 1).expand(1, n, 1), torch.zeros(1, 1).expand(2, n)
    out_emb, grad_out = torch.zeros(1, 3, 1), torch.zeros(2, 3)
    coeff, params = torch.ones(1), torch.zeros(3)
    with pytest.raises(ValueError, match="in_emb: the cpu backend's sampled backward takes n ≤ 2147483647"):
        problem = KernelProblem(out_emb, in_emb, "piecewise_linear", coeff, params, 0.0, "hard")
        cpu.sparse_linear_backward(grad_out, x, None, problem, 0.99, torch.tensor(0.0), grad_out)
