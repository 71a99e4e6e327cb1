"""The ``triton`` backend: Triton kernels, on CUDA tensors, or on CPU tensors through
Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels are defined).

Kernels: the Tucker ops and LieRA's ``lowrank_hadamard_merge`` (``lowrank.py``),
``matrix_exp`` (``expm.py``) and SNELL's kernelized and sparsification ops
(``kernelized.py``). The kernel modules import Triton, so they are imported only once
Triton is known to load."""

from __future__ import annotations

import importlib
import os

DEVICE_TYPES = ("cpu", "cuda")


def unavailable_reason(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not installed or does not load ({error})"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on CPU tensors Triton runs only through its interpreter: set TRITON_INTERPRET=1"
    return None


_KERNEL_MODULES = {
    "tucker_delta": "lowrank", "tucker_merge": "lowrank", "tucker_delta_backward": "lowrank",
    "lowrank_hadamard_merge": "lowrank", "lowrank_hadamard_merge_backward": "lowrank",
    "matrix_exp": "expm", "matrix_exp_backward": "expm",
    "kernelized_delta": "kernelized", "kernelized_delta_backward": "kernelized",
    "kernelized_sparse_delta": "kernelized", "kernelized_sparse_delta_backward": "kernelized",
    "kernelized_sparse_linear_backward": "kernelized",
    "sparsify": "kernelized", "sparsify_backward": "kernelized",
}  # fmt: skip


def __getattr__(name: str):
    """The op functions, from their kernel modules, imported on first use (an op whose
    module cannot load, Triton missing, is not there)."""
    if name not in _KERNEL_MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{_KERNEL_MODULES[name]}")
    except ImportError as error:
        raise AttributeError(f"{name}: the Triton kernels do not load ({error})") from None
    return getattr(module, name)
