"""The ``triton`` backend: Triton kernels, on CUDA tensors, or on CPU tensors through
Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels are defined).

Kernels: the Tucker ops and LieRA's ``lowrank_hadamard_merge`` (``lowrank.py``),
``matrix_exp`` (``expm.py``), SNELL's kernelized ops (``kernelized.py``) and the
sparsification (``select.py``: the threshold by radix select, and the mask), each op registered there (``@register(op, "triton")``, or
``tucker_split.register_ops`` for the Tucker and hadamard ops). The
kernel modules import Triton: they are imported (and so registered) here once Triton is
known to load; without it the backend has no kernels and says why. The kernels read and
write float16/bfloat16 tensors too, computing in float32 (``KERNEL_DTYPES``; ``shared.py``)."""

from __future__ import annotations

import os

import torch


def _load_kernels() -> str | None:
    """Imports the kernel modules; why they do not load, or ``None``."""
    try:
        import triton  # noqa: F401

        from . import expm, kernelized, lowrank, select  # noqa: F401
    except ImportError as error:
        return f"triton is not installed or does not load ({error})"
    return None


DEVICE_TYPES = ("cpu", "cuda")
_LOAD_ERROR = _load_kernels()
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def unavailable_reason(device_type: str) -> str | None:
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on CPU tensors Triton runs only through its interpreter: set TRITON_INTERPRET=1"
    return None
