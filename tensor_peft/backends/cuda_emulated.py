"""The ``cuda_emulated`` backend: the CUDA C++ kernels of csrc/cuda, compiled by g++ with
CUDA's execution model emulated on the host (``csrc/cuda/emulation.h``), as the extension
``tensor_peft._cuda_emulated``, run on CPU tensors through the launchers of the ``cuda``
backend (no device guard, stream 0).

It runs the real kernels where there is no GPU: threads of a block as fibers with real
``__syncthreads`` barriers, warps with their shuffles, shared memory and atomics, and the
limits a GPU puts on a launch. ``tensor_peft._cuda_emulated.set_schedule("reverse")`` (or
``"shuffle"`` with a seed) runs threads and blocks in another order, to find races. It is
slow, and says nothing of timing or memory coalescing. Built only when asked for:
``TENSOR_PEFT_CUDA_EMULATION=1`` at build time."""

from __future__ import annotations

import contextlib
import importlib.util

from .cuda import KERNEL_DTYPES as KERNEL_DTYPES  # the same kernels: half tensors read and written directly
from .cuda import register_kernels
from .native import CUDA_EMULATED

DEVICE_TYPES = ("cpu",)


def unavailable_reason(device_type: str) -> str | None:
    if importlib.util.find_spec(CUDA_EMULATED.name) is None:
        return f"{CUDA_EMULATED.name} is not built (set TENSOR_PEFT_CUDA_EMULATION=1 when building tensor_peft)"
    return CUDA_EMULATED.import_error()


register_kernels("cuda_emulated", CUDA_EMULATED, lambda device: contextlib.nullcontext(), lambda tensor: 0)
