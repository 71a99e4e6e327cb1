"""The compiled extensions and their kernels, each reached by its attribute.

``C`` (``tensor_peft._C``, csrc/cpu), ``CUDA`` (``tensor_peft._cuda``, csrc/cuda built by
nvcc) and ``CUDA_EMULATED`` (``tensor_peft._cuda_emulated``, the same sources built by g++)
are imported when a kernel first runs, never when tensor_peft is imported: a missing build
makes its backend unavailable, with the reason (``Extension.import_error``).

Each kernel is compiled once per dtype, the variants named ``<kernel>_f32``, ``_f64`` and, in
the CUDA builds, ``_f16`` and ``_bf16``. ``cpu_kernels`` and ``cuda_kernels`` are the one map
from a dtype to those variants: the backends call ``cpu_kernels(dtype).sparsify(...)``.
``problem_arguments`` is the one place a ``KernelProblem`` becomes the keyword arguments of
the kernelized kernels (the fields of the C++ ``Problem<T>``)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from ..config import KERNELS, MODES
from .kernelized_ops import KernelProblem


def _load_C() -> ModuleType:
    import tensor_peft._C as module

    return module


def _load_cuda() -> ModuleType:
    import tensor_peft._cuda as module

    return module


def _load_cuda_emulated() -> ModuleType:
    import tensor_peft._cuda_emulated as module

    return module


@dataclasses.dataclass(frozen=True)
class Extension:
    """A compiled extension of tensor_peft, imported at first use by ``load``."""

    name: str
    load: Callable[[], ModuleType]

    def module(self) -> ModuleType:
        """The extension's module (ImportError when it is not built or does not load)."""
        return self.load()

    def import_error(self) -> str | None:
        """Why the extension does not load; ``None`` if it does."""
        try:
            self.load()
        except ImportError as error:
            return f"the extension {self.name} is not built or does not load ({error})"
        return None


C = Extension("tensor_peft._C", _load_C)
CUDA = Extension("tensor_peft._cuda", _load_cuda)
CUDA_EMULATED = Extension("tensor_peft._cuda_emulated", _load_cuda_emulated)


CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""The dtypes of the kernel variants, in the order the tables below list them."""


def _column(dtype: torch.dtype, dtypes: tuple[torch.dtype, ...], extension: Extension) -> int:
    """The index of ``dtype``'s variant in the tables below."""
    if dtype not in dtypes:
        raise TypeError(f"{extension.name} has no kernels for {dtype}")
    return dtypes.index(dtype)


@dataclasses.dataclass(frozen=True)
class CpuKernels:
    """The kernels of ``tensor_peft._C`` for one dtype (csrc/cpu)."""

    lowrank_forward: Callable
    lowrank_backward: Callable
    matrix_exp: Callable
    matrix_exp_backward: Callable
    kernelized_forward: Callable
    kernelized_backward: Callable
    sparse_linear_backward: Callable
    sparsify: Callable
    sparsify_backward: Callable


@functools.cache
def cpu_kernels(dtype: torch.dtype) -> CpuKernels:
    """The ``_C`` kernels for ``dtype`` (one of ``CPU_DTYPES``)."""
    m, column = C.module(), _column(dtype, CPU_DTYPES, C)
    return CpuKernels(
        lowrank_forward=(m.lowrank_forward_f32, m.lowrank_forward_f64)[column],
        lowrank_backward=(m.lowrank_backward_f32, m.lowrank_backward_f64)[column],
        matrix_exp=(m.matrix_exp_f32, m.matrix_exp_f64)[column],
        matrix_exp_backward=(m.matrix_exp_backward_f32, m.matrix_exp_backward_f64)[column],
        kernelized_forward=(m.kernelized_forward_f32, m.kernelized_forward_f64)[column],
        kernelized_backward=(m.kernelized_backward_f32, m.kernelized_backward_f64)[column],
        sparse_linear_backward=(m.sparse_linear_backward_f32, m.sparse_linear_backward_f64)[column],
        sparsify=(m.sparsify_f32, m.sparsify_f64)[column],
        sparsify_backward=(m.sparsify_backward_f32, m.sparsify_backward_f64)[column],
    )


@dataclasses.dataclass(frozen=True)
class CudaKernels:
    """The kernels of a build of csrc/cuda (``_cuda`` or ``_cuda_emulated``) for one storage
    dtype. ``matrix_exp`` has no half variants: None for float16 and bfloat16."""

    lowrank_forward: Callable
    lowrank_backward: Callable
    kernelized_forward: Callable
    kernelized_backward: Callable
    kernelized_select_workspace: Callable
    sparsify: Callable
    sparsify_backward: Callable
    matrix_exp: Callable | None
    matrix_exp_backward: Callable | None
    matrix_exp_workspace: Callable | None


def cuda_kernels(extension: Extension, dtype: torch.dtype) -> CudaKernels:
    """The kernels of ``extension`` (``CUDA`` or ``CUDA_EMULATED``) for ``dtype`` (one of ``CUDA_DTYPES``)."""
    return _cuda_kernels(extension.module(), _column(dtype, CUDA_DTYPES, extension))


@functools.cache
def _cuda_kernels(m: ModuleType, column: int) -> CudaKernels:
    return CudaKernels(
        lowrank_forward=(m.lowrank_forward_f32, m.lowrank_forward_f64, m.lowrank_forward_f16,
                         m.lowrank_forward_bf16)[column],
        lowrank_backward=(m.lowrank_backward_f32, m.lowrank_backward_f64, m.lowrank_backward_f16,
                          m.lowrank_backward_bf16)[column],
        kernelized_forward=(m.kernelized_forward_f32, m.kernelized_forward_f64, m.kernelized_forward_f16,
                            m.kernelized_forward_bf16)[column],
        kernelized_backward=(m.kernelized_backward_f32, m.kernelized_backward_f64, m.kernelized_backward_f16,
                             m.kernelized_backward_bf16)[column],
        kernelized_select_workspace=(m.kernelized_select_workspace_f32, m.kernelized_select_workspace_f64,
                                     m.kernelized_select_workspace_f16, m.kernelized_select_workspace_bf16)[column],
        sparsify=(m.sparsify_f32, m.sparsify_f64, m.sparsify_f16, m.sparsify_bf16)[column],
        sparsify_backward=(m.sparsify_backward_f32, m.sparsify_backward_f64, m.sparsify_backward_f16,
                           m.sparsify_backward_bf16)[column],
        matrix_exp=(m.matrix_exp_f32, m.matrix_exp_f64, None, None)[column],
        matrix_exp_backward=(m.matrix_exp_backward_f32, m.matrix_exp_backward_f64, None, None)[column],
        matrix_exp_workspace=(m.matrix_exp_workspace_f32, m.matrix_exp_workspace_f64, None, None)[column],
    )


def kernel_id(kernel: str, extension: ModuleType | None = None) -> int:
    """The number the kernels take for the kernel function ``kernel``: from the compiled
    ``extension``'s ``KERNEL_IDS`` (``_C``, ``_cuda``: csrc/include/tensor_peft/kernelized.h
    defines them), else (the triton backend, which runs without one) its place in
    ``KERNELS``; a test asserts that the two agree."""
    return KERNELS.index(kernel) if extension is None else extension.KERNEL_IDS[kernel]


def mode_id(mode: str | None, extension: ModuleType | None = None) -> int:
    """The number the kernels take for the sparsification ``mode`` (None: none), from the
    ``extension``'s ``MODE_IDS`` as ``kernel_id``, else 0 none, 1 hard, 2 soft."""
    name = "none" if mode is None else mode
    return ("none", *MODES).index(name) if extension is None else extension.MODE_IDS[name]


def problem_arguments(problem: KernelProblem, in_t: Tensor, module: ModuleType) -> dict:
    """The keyword arguments of ``module``'s kernelized kernels (``kernelized_forward``,
    ``kernelized_backward``, ``sparse_linear_backward``) that describe ``problem``, with In
    given as ``in_t`` (H, p, n) contiguous (the caller keeps it alive through the call):
    pointers to the tensors, the sizes, and the kernel function's and the mode's numbers."""
    chunks, m, width = problem.out_emb.shape
    return dict(
        out_emb=problem.out_emb.data_ptr(), in_t=in_t.data_ptr(), rows=m, n=in_t.shape[2], chunks=chunks, width=width,
        kernel=kernel_id(problem.kernel, module), coeff=problem.coeff.data_ptr(), params=problem.params.data_ptr(),
        eps=problem.eps, mode=mode_id(problem.mode, module),
    )  # fmt: skip
