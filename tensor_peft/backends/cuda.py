"""The ``cuda`` backend: CUDA C++ kernels of the compiled extension ``tensor_peft._cuda``.

Tensors reach the kernels as raw device pointers with the current CUDA stream as an
integer; the op layer has checked their shapes and made them contiguous on one device.
Kernels: ΔW = s·U·R updates with an add / exp / taylor1 epilogue, one pass over W0 or Γ
(``csrc/cuda/lowrank.cu``): the Tucker ops after the split of ``tucker_split`` and
LieRA's ``lowrank_hadamard_merge``; ``matrix_exp`` with its backward
(``csrc/cuda/expm.cu``: a team of threads per matrix, the math of the CPU kernel, the
workspace in shared memory where it fits); and SNELL's kernelized and sparsification ops
(``csrc/cuda/kernelized.cu``: τ by radix select stays on the device). FLoRA's projected
gradients are small contractions in plain torch (``tensor_algebra``). Each op is a
function registered by ``register_kernels``, the Tucker and hadamard ops by
``tucker_split.register_ops``; the ``cuda_emulated`` backend registers the same launchers
on its build of the same kernels. Each launcher reaches its kernel through
``native.cuda_kernels`` (the one map from a dtype to a kernel variant).

Dtypes (``KERNEL_DTYPES``): the large tensors of a call (W0, ΔW, Γ, sparsify's delta) are
read and written in float16/bfloat16 directly when they share that dtype and the call
computes in float32 (the ``_f16``/``_bf16`` kernels: each value widened exactly, the
arithmetic in float32, each result rounded once to nearest even); the small ones (U, R,
the embeddings, the kernel function's parameters) are cast to the compute dtype,
gradients are summed in compute-dtype buffers and rounded once into their inputs' dtypes,
and τ is the compute dtype's. Half tensors in a float64 call are cast to float64 (``storage_dtype``).
``matrix_exp`` has no half kernel: a half A is cast to float32 and the result rounded
once into A's dtype."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from ..config import HALF_DTYPES
from .determinism import check_deterministic
from . import tucker_split
from .kernelized_ops import KernelProblem, sparse_linear_backward_from_dense
from .native import CUDA, Extension, cuda_kernels, kernel_id, mode_id, problem_arguments
from .registry import register
from .tensor_algebra import compute_dtype

DEVICE_TYPES = ("cuda",)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason(device_type: str) -> str | None:
    reason = CUDA.import_error()
    if reason is not None:
        return reason
    built = CUDA.module()
    capabilities = [torch.cuda.get_device_capability(index) for index in range(torch.cuda.device_count())]
    return incompatibility(built.build_info(), built.driver_version(), capabilities)


def _arch(name: str) -> tuple[int, int, str]:
    """"86" -> (8, 6, ""), "90a" -> (9, 0, "a"), "100f" -> (10, 0, "f")."""
    digits = name.rstrip("af")
    return int(digits) // 10, int(digits) % 10, name[len(digits):]


def _runs_on(arch: str, capability: tuple[int, int], ptx: bool) -> bool:
    """Whether code built for ``arch`` runs on a GPU of ``capability``: machine code runs
    on the same major version at an equal or newer minor ("a": that exact GPU only); PTX
    is compiled by the driver for any newer GPU ("a" and "f": its own major version only)."""
    major, minor, variant = _arch(arch)
    if variant == "a":
        return capability == (major, minor)
    if ptx and not variant:
        return capability >= (major, minor)
    return capability[0] == major and capability[1] >= minor


def incompatibility(build_info: dict, driver_version: int, capabilities: list[tuple[int, int]]) -> str | None:
    """Why the built extension cannot run with this driver on these GPUs; ``None`` when it can.

    The CUDA runtime linked into the extension needs a driver of at least its major version
    (a CUDA 13 runtime needs R580+; torch's CUDA 12 builds run on older drivers)."""
    runtime = build_info["cuda_runtime_version"]
    runtime_major = runtime // 1000
    if driver_version < runtime_major * 1000:
        found = (
            "no NVIDIA driver was found" if driver_version == 0
            else f"the NVIDIA driver supports CUDA up to {driver_version // 1000}.{driver_version % 1000 // 10}"
        )  # fmt: skip
        return (
            f"{found}, but tensor_peft._cuda was built with the CUDA {runtime_major}.{runtime % 1000 // 10} "
            f"runtime, which needs a driver for CUDA {runtime_major}.0 or newer: update the driver, or rebuild "
            f"tensor_peft with the CUDA toolkit of the major version torch was built with "
            f"(torch.version.cuda = {torch.version.cuda})"
        )
    archs = [a for a in build_info["archs"].split(";") if a]
    newest = max(archs, key=lambda a: _arch(a)[:2])
    for index, capability in enumerate(capabilities):
        if not any(_runs_on(a, capability, ptx=False) for a in archs) and not _runs_on(newest, capability, ptx=True):
            return (
                f"GPU {index} (compute capability {capability[0]}.{capability[1]}) cannot run the kernels built "
                f"for {', '.join('sm_' + a for a in archs)}: rebuild with TENSOR_PEFT_CUDA_ARCHS including "
                f"{capability[0]}{capability[1]}"
            )
    return None


def storage_dtype(compute: torch.dtype, *large: Tensor | None) -> torch.dtype:
    """The dtype a kernel reads and writes the ``large`` tensors of a call in: their half
    dtype when they all share one and the call computes in float32, else ``compute``."""
    dtypes = {tensor.dtype for tensor in large if tensor is not None}
    if compute == torch.float32 and len(dtypes) == 1 and dtypes <= set(HALF_DTYPES):
        return dtypes.pop()
    return compute


def _as(tensor: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``tensor`` contiguous in ``dtype`` (itself when it already is; None stays None)."""
    return None if tensor is None else tensor.to(dtype).contiguous()


def _current_stream(tensor: Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


def register_kernels(
    backend: str,
    extension: Extension,
    device_guard: Callable[[torch.device], contextlib.AbstractContextManager],
    stream_of: Callable[[Tensor], int],
) -> None:
    """Registers every op for ``backend`` on the kernels of ``extension`` (a build of
    csrc/cuda): each launch runs inside ``device_guard(d)`` (which makes the tensors' device
    current) on the stream handle ``stream_of(tensor)``."""

    def kernels(dtype: torch.dtype):
        return cuda_kernels(extension, dtype)

    def launch_forward(out, weight, U, R, d0, r0, n, scale, epilogue="add"):
        compute = compute_dtype(*(t for t in (out, weight, U, R) if t is not None))
        storage = storage_dtype(compute, out, weight)
        written = out if out.dtype == storage else torch.empty_like(out, dtype=storage)
        weight, U, R = _as(weight, storage), _as(U, compute), _as(R, compute)
        with device_guard(out.device):
            kernels(storage).lowrank_forward(
                out=written.data_ptr(), weight=0 if weight is None else weight.data_ptr(), U=U.data_ptr(),
                R=R.data_ptr(), d0=d0, r0=r0, n=n, scale=scale, epilogue=extension.module().EPILOGUE_IDS[epilogue],
                stream=stream_of(out),
            )  # fmt: skip
        if written is not out:
            out.copy_(written)

    def launch_backward(grad, weight, U, R, d_U, d_R, d0, r0, n, scale, epilogue="add"):
        """Adds into d_U and d_R, both in the compute dtype."""
        check_deterministic("tucker_delta_backward" if epilogue == "add" else "lowrank_hadamard_merge_backward", backend)
        compute = d_U.dtype
        storage = storage_dtype(compute, grad, weight)
        grad, weight, U, R = _as(grad, storage), _as(weight, storage), _as(U, compute), _as(R, compute)
        with device_guard(grad.device):
            kernels(storage).lowrank_backward(
                grad=grad.data_ptr(), weight=0 if weight is None else weight.data_ptr(), U=U.data_ptr(), R=R.data_ptr(),
                d0=d0, r0=r0, n=n, scale=scale, epilogue=extension.module().EPILOGUE_IDS[epilogue], dU=d_U.data_ptr(),
                dR=d_R.data_ptr(), stream=stream_of(grad),
            )  # fmt: skip

    tucker_split.register_ops(backend, launch_forward, launch_backward)

    def expm_launch(A, backward, /, **pointers):
        """Runs ``matrix_exp`` (``matrix_exp_backward`` when ``backward``) over A's matrices with
        the global workspace the extension asks for on A's device (none when shared memory holds it)."""
        n = A.shape[-1]
        batch = A.numel() // (n * n) if n else 0
        dtype_kernels = kernels(A.dtype)
        launch = dtype_kernels.matrix_exp_backward if backward else dtype_kernels.matrix_exp
        with device_guard(A.device):
            work = A.new_empty(batch * dtype_kernels.matrix_exp_workspace(n=n, backward=backward))
            launch(**pointers, batch=batch, n=n, work=work.data_ptr(), stream=stream_of(A))

    @register("matrix_exp", backend)
    def matrix_exp(A: Tensor) -> Tensor:
        """exp(A) in A's dtype; a half A is computed in float32 (small matrices: a cast each way)."""
        computed = _as(A, compute_dtype(A))
        out = torch.empty_like(computed)
        expm_launch(computed, False, out=out.data_ptr(), A=computed.data_ptr())
        return out.to(A.dtype)

    @register("matrix_exp_backward", backend)
    def matrix_exp_backward(grad: Tensor, A: Tensor) -> Tensor:
        dtype = compute_dtype(grad, A)
        grad, computed = _as(grad, dtype), _as(A, dtype)
        d_A = torch.empty_like(computed)
        expm_launch(computed, True, d_A=d_A.data_ptr(), grad=grad.data_ptr(), A=computed.data_ptr())
        return d_A.to(A.dtype)

    def columns_workspace(params: Tensor, n: int, kernel: str) -> Tensor:
        """The columns workspace of the kernelized kernels (mixture's column statistics), in params' dtype."""
        module = extension.module()
        return params.new_empty(module.kernelized_columns_workspace(n=n, kernel=kernel_id(kernel, module)))

    def select_work(compute: torch.dtype, device: torch.device) -> Tensor:
        size = kernels(compute).kernelized_select_workspace()
        return torch.empty(size, dtype=torch.int64, device=device)

    def computed(problem: KernelProblem) -> tuple[KernelProblem, Tensor]:
        """(``problem`` with Out and coeff in the compute dtype, In transposed to (H, p, n) in
        it): params' dtype, which the op layer never makes half."""
        compute = problem.params.dtype
        in_t = _as(problem.in_emb.transpose(1, 2), compute)
        return problem._replace(out_emb=_as(problem.out_emb, compute), coeff=_as(problem.coeff, compute)), in_t

    @register("kernelized_sparse_delta", backend)
    def kernelized_sparse_delta(problem: KernelProblem, k, tau=None):
        """[ΔW, τ]: κ(Out, In) in out_emb's dtype, sparsified when ``problem.mode`` is given
        (None: the dense op). The kernel selects τ (compute dtype) when k > 0 and otherwise
        masks by the τ it is given: −inf (keep all) for k = 0, or ``tau``. With a sparsity, a
        half ΔW is κ masked in the compute dtype (a buffer) and rounded once."""
        m, n = problem.shape
        compute, (problem_c, in_t) = problem.params.dtype, computed(problem)
        storage = storage_dtype(compute, problem.out_emb)
        out = problem.out_emb.new_empty(m, n, dtype=storage)
        raw = out if problem.mode is None or storage == compute else problem.out_emb.new_empty(m, n, dtype=compute)
        if tau is None:
            tau = problem.params.new_full((), float("-inf"))
        else:
            k = 0  # read, not written
            tau = _as(tau, compute)
        columns = columns_workspace(problem.params, n, problem.kernel)
        work = select_work(compute, out.device)
        with device_guard(out.device):
            kernels(storage).kernelized_forward(
                out=out.data_ptr(), **problem_arguments(problem_c, in_t, extension.module()), k=k, tau=tau.data_ptr(),
                raw=raw.data_ptr(), columns=columns.data_ptr(), select_work=work.data_ptr(), stream=stream_of(out),
            )  # fmt: skip
        return [out.to(problem.out_emb.dtype), tau]

    @register("kernelized_sparse_delta_backward", backend)
    def kernelized_sparse_delta_backward(grad, problem: KernelProblem, tau):
        mode = problem.mode
        check_deterministic("kernelized_delta_backward" if mode is None else "kernelized_sparse_delta_backward", backend)
        compute, (problem_c, in_t) = problem.params.dtype, computed(problem)
        storage = storage_dtype(compute, grad)
        grad, tau = _as(grad, storage), _as(tau, compute)
        d_out, d_in_t = torch.zeros_like(problem_c.out_emb), torch.zeros_like(in_t)  # atomic sums in the compute dtype
        d_coeff = torch.zeros_like(problem.coeff, dtype=torch.float64)  # sums over m·n entries
        d_params = torch.zeros_like(problem.params, dtype=torch.float64)
        columns = columns_workspace(problem.params, problem.shape[1], problem.kernel)
        with device_guard(grad.device):
            kernels(storage).kernelized_backward(
                grad=grad.data_ptr(), **problem_arguments(problem_c, in_t, extension.module()),
                tau=0 if tau is None else tau.data_ptr(), d_out_emb=d_out.data_ptr(), d_in_t=d_in_t.data_ptr(),
                d_coeff=d_coeff.data_ptr(), d_params=d_params.data_ptr(), columns=columns.data_ptr(),
                stream=stream_of(grad),
            )  # fmt: skip
        return [d_out.to(problem.out_emb.dtype), d_in_t.transpose(1, 2).to(problem.in_emb.dtype).contiguous(),
                d_coeff.to(problem.coeff.dtype), d_params.to(problem.params.dtype)]  # fmt: skip

    @register("sparse_linear_backward", backend)
    def sparse_linear_backward(*args):
        return sparse_linear_backward_from_dense(kernelized_sparse_delta, kernelized_sparse_delta_backward, *args)

    @register("sparsify", backend)
    def sparsify(delta, k, mode):
        """[the sparsified delta in its dtype, τ in the compute dtype]."""
        compute = compute_dtype(delta)
        storage = storage_dtype(compute, delta)
        computed = _as(delta, storage)
        out, tau = torch.empty_like(computed), delta.new_full((), float("-inf"), dtype=compute)
        work = select_work(compute, delta.device)
        with device_guard(delta.device):
            kernels(storage).sparsify(
                out=out.data_ptr(), delta=computed.data_ptr(), count=delta.numel(), k=k,
                mode=mode_id(mode, extension.module()), tau=tau.data_ptr(), select_work=work.data_ptr(),
                stream=stream_of(delta),
            )  # fmt: skip
        return [out.to(delta.dtype), tau]

    @register("sparsify_backward", backend)
    def sparsify_backward(grad, delta, tau, mode):
        compute = compute_dtype(grad, delta, tau)
        storage = storage_dtype(compute, grad, delta)
        grad, computed, tau = _as(grad, storage), _as(delta, storage), _as(tau, compute)
        d_delta = torch.empty_like(computed)
        with device_guard(delta.device):
            kernels(storage).sparsify_backward(
                d_delta=d_delta.data_ptr(), grad=grad.data_ptr(), delta=computed.data_ptr(), count=delta.numel(),
                tau=tau.data_ptr(), mode=mode_id(mode, extension.module()), stream=stream_of(delta),
            )  # fmt: skip
        return d_delta.to(delta.dtype)


register_kernels("cuda", CUDA, torch.cuda.device, _current_stream)
