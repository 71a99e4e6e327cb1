"""The ``cuda`` backend: CUDA C++ kernels of the compiled extension ``tensor_peft._cuda``.

Tensors reach the kernels as raw device pointers with the current CUDA stream as an
integer; the op layer has checked their shapes and made them contiguous float32/float64
on one device. Kernels: ΔW = s·U·R updates with an add / exp / taylor1 epilogue, one pass
over W0 or Γ (``csrc/cuda/lowrank.cu``): the Tucker ops after the split of
``tucker_split`` and LieRA's ``lowrank_hadamard_merge``; ``matrix_exp`` with its
backward (``csrc/cuda/expm.cu``: a team of threads per matrix, the math of the CPU kernel,
the workspace in shared memory where it fits); and SNELL's kernelized and sparsification
ops (``csrc/cuda/kernelized.cu``: τ by radix select stays on the device).
FLoRA's projected gradients are small contractions in plain torch (``tensor_algebra``).
Each op is a function registered by ``register_kernels``, the Tucker and hadamard ops by
``tucker_split.register_ops``; the ``cuda_emulated`` backend registers the same launchers
on its build of the same kernels."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from .determinism import check_deterministic
from . import tucker_split
from .kernelized_ops import kernel_id, mode_id, sparse_linear_backward_from_dense
from .registry import extension, extension_import_error, extension_kernel, register

DEVICE_TYPES = ("cuda",)


def unavailable_reason(device_type: str) -> str | None:
    reason = extension_import_error("_cuda")
    if reason is not None:
        return reason
    built = extension("_cuda")
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


def _current_stream(tensor: Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


def register_kernels(
    backend: str,
    module: str,
    device_guard: Callable[[torch.device], contextlib.AbstractContextManager],
    stream_of: Callable[[Tensor], int],
) -> None:
    """Registers every op for ``backend`` on the kernels of the extension
    ``tensor_peft.<module>`` (a build of csrc/cuda): each launch runs inside ``device_guard(d)``
    (which makes the tensors' device current) on the stream handle ``stream_of(tensor)``."""

    def launcher(name: str, dtype: torch.dtype) -> Callable:
        return extension_kernel(module, name, dtype)

    def launch_forward(out, weight, U, R, d0, r0, n, scale, epilogue="add"):
        with device_guard(out.device):
            launcher("lowrank_forward", out.dtype)(
                out=out.data_ptr(), weight=0 if weight is None else weight.data_ptr(), U=U.data_ptr(), R=R.data_ptr(),
                d0=d0, r0=r0, n=n, scale=scale, epilogue=extension(module).EPILOGUE_IDS[epilogue], stream=stream_of(out),
            )  # fmt: skip

    def launch_backward(grad, weight, U, R, d_U, d_R, d0, r0, n, scale, epilogue="add"):
        check_deterministic("tucker_delta_backward" if epilogue == "add" else "lowrank_hadamard_merge_backward", backend)
        with device_guard(grad.device):
            launcher("lowrank_backward", grad.dtype)(
                grad=grad.data_ptr(), weight=0 if weight is None else weight.data_ptr(), U=U.data_ptr(), R=R.data_ptr(),
                d0=d0, r0=r0, n=n, scale=scale, epilogue=extension(module).EPILOGUE_IDS[epilogue], dU=d_U.data_ptr(),
                dR=d_R.data_ptr(), stream=stream_of(grad),
            )  # fmt: skip

    tucker_split.register_ops(backend, launch_forward, launch_backward)

    def expm_launch(name, A, backward, /, **pointers):
        """Runs ``matrix_exp[_backward]`` over A's matrices with the global workspace the
        extension asks for on A's device (none when shared memory holds it)."""
        n = A.shape[-1]
        batch = A.numel() // (n * n) if n else 0
        with device_guard(A.device):
            work = A.new_empty(batch * launcher("matrix_exp_workspace", A.dtype)(n=n, backward=backward))
            launcher(name, A.dtype)(**pointers, batch=batch, n=n, work=work.data_ptr(), stream=stream_of(A))

    @register("matrix_exp", backend)
    def matrix_exp(A: Tensor) -> Tensor:
        out = torch.empty_like(A)
        expm_launch("matrix_exp", A, False, out=out.data_ptr(), A=A.data_ptr())
        return out

    @register("matrix_exp_backward", backend)
    def matrix_exp_backward(grad: Tensor, A: Tensor) -> Tensor:
        d_A = torch.empty_like(A)
        expm_launch("matrix_exp_backward", A, True, d_A=d_A.data_ptr(), grad=grad.data_ptr(), A=A.data_ptr())
        return d_A

    def columns_workspace(out_emb: Tensor, n: int, kernel: str) -> Tensor:
        """The columns workspace of the kernelized kernels (mixture's column statistics)."""
        ids = extension(module)
        return out_emb.new_empty(ids.kernelized_columns_workspace(n=n, kernel=kernel_id(kernel, ids)))

    def select_work(x: Tensor) -> Tensor:
        size = launcher("kernelized_select_workspace", x.dtype)()
        return torch.empty(size, dtype=torch.int64, device=x.device)

    @register("kernelized_sparse_delta", backend)
    def kernelized_sparse_delta(out_emb, in_emb, k, kernel, coeff, params, eps, mode, tau=None):
        """[ΔW, τ]: κ(Out, In), sparsified when ``mode`` is given (None: the dense op). In goes
        in as (H, p, n). The kernel selects τ when k > 0 and otherwise masks by the τ it is
        given: −inf (keep all) for k = 0, or ``tau``."""
        chunks, m, width = out_emb.shape
        n = in_emb.shape[1]
        out = out_emb.new_empty(m, n)
        if tau is None:
            tau = out_emb.new_full((), float("-inf"))
        else:
            k = 0  # read, not written
        in_t = in_emb.transpose(1, 2).contiguous()
        columns = columns_workspace(out_emb, n, kernel)
        work = select_work(out)
        with device_guard(out.device):
            launcher("kernelized_forward", out.dtype)(
                out=out.data_ptr(), out_emb=out_emb.data_ptr(), in_t=in_t.data_ptr(), rows=m, n=n, chunks=chunks,
                width=width, kernel=kernel_id(kernel, extension(module)), coeff=coeff.data_ptr(), params=params.data_ptr(),
                eps=eps, k=k, mode=mode_id(mode, extension(module)), tau=tau.data_ptr(), columns=columns.data_ptr(),
                select_work=work.data_ptr(), stream=stream_of(out),
            )  # fmt: skip
        return [out, tau]

    @register("kernelized_sparse_delta_backward", backend)
    def kernelized_sparse_delta_backward(grad, out_emb, in_emb, tau, kernel, coeff, params, eps, mode):
        check_deterministic("kernelized_delta_backward" if mode is None else "kernelized_sparse_delta_backward", backend)
        chunks, m, width = out_emb.shape
        n = in_emb.shape[1]
        d_out, d_in_t = torch.zeros_like(out_emb), in_emb.new_zeros(chunks, width, n)
        d_coeff = torch.zeros_like(coeff, dtype=torch.float64)  # sums over m·n entries
        d_params = torch.zeros_like(params, dtype=torch.float64)
        in_t = in_emb.transpose(1, 2).contiguous()
        columns = columns_workspace(out_emb, n, kernel)
        with device_guard(grad.device):
            launcher("kernelized_backward", grad.dtype)(
                grad=grad.data_ptr(), out_emb=out_emb.data_ptr(), in_t=in_t.data_ptr(), rows=m, n=n, chunks=chunks,
                width=width, kernel=kernel_id(kernel, extension(module)), coeff=coeff.data_ptr(), params=params.data_ptr(),
                eps=eps, tau=0 if tau is None else tau.data_ptr(), mode=mode_id(mode, extension(module)),
                d_out_emb=d_out.data_ptr(), d_in_t=d_in_t.data_ptr(), d_coeff=d_coeff.data_ptr(),
                d_params=d_params.data_ptr(), columns=columns.data_ptr(), stream=stream_of(grad),
            )  # fmt: skip
        return [d_out, d_in_t.transpose(1, 2).contiguous(), d_coeff.to(coeff.dtype), d_params.to(params.dtype)]

    @register("sparse_linear_backward", backend)
    def sparse_linear_backward(*args):
        return sparse_linear_backward_from_dense(kernelized_sparse_delta, kernelized_sparse_delta_backward, *args)

    @register("sparsify", backend)
    def sparsify(delta, k, mode):
        out, tau = torch.empty_like(delta), delta.new_full((), float("-inf"))
        work = select_work(delta)
        with device_guard(delta.device):
            launcher("sparsify", delta.dtype)(
                out=out.data_ptr(), delta=delta.data_ptr(), count=delta.numel(), k=k, mode=mode_id(mode, extension(module)),
                tau=tau.data_ptr(), select_work=work.data_ptr(), stream=stream_of(delta),
            )  # fmt: skip
        return [out, tau]

    @register("sparsify_backward", backend)
    def sparsify_backward(grad, delta, tau, mode):
        d_delta = torch.empty_like(delta)
        with device_guard(delta.device):
            launcher("sparsify_backward", delta.dtype)(
                d_delta=d_delta.data_ptr(), grad=grad.data_ptr(), delta=delta.data_ptr(), count=delta.numel(),
                tau=tau.data_ptr(), mode=mode_id(mode, extension(module)), stream=stream_of(delta),
            )  # fmt: skip
        return d_delta


register_kernels("cuda", "_cuda", torch.cuda.device, _current_stream)
