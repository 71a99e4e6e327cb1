"""The numbers the native backends' SNELL kernels take for a kernel function and a
sparsification mode."""

from __future__ import annotations

from types import ModuleType

from ..config import KERNELS, MODES


def kernel_id(kernel: str, extension: ModuleType | None = None) -> int:
    """The number the kernels take for ``kernel``: from the compiled ``extension``'s
    ``KERNEL_IDS`` (``_C``, ``_cuda``: csrc/include/tensor_peft/kernelized.h defines them),
    else (the triton backend, which runs without one) its place in ``KERNELS``; a test
    asserts that the two agree."""
    return KERNELS.index(kernel) if extension is None else extension.KERNEL_IDS[kernel]


def mode_id(mode: str | None, extension: ModuleType | None = None) -> int:
    """The number the kernels take for the sparsification ``mode`` (None: none), from the
    ``extension``'s ``MODE_IDS`` as ``kernel_id``, else 0 none, 1 hard, 2 soft."""
    name = "none" if mode is None else mode
    return ("none", *MODES).index(name) if extension is None else extension.MODE_IDS[name]
