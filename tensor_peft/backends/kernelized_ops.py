"""The numbers the native backends' SNELL kernels take for a kernel function and a
sparsification mode."""

from __future__ import annotations

from .reference import KERNELS, MODES


def kernel_id(kernel: str) -> int:
    """The number the native kernels take for ``kernel``: its place in ``KERNELS``."""
    return KERNELS.index(kernel)


def mode_id(mode: str | None) -> int:
    """The number the native kernels take for ``mode``: 0 none, 1 hard, 2 soft."""
    return 0 if mode is None else MODES.index(mode) + 1
