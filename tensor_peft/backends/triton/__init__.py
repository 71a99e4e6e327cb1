"""The ``triton`` backend: Triton kernels, on CUDA tensors, or on CPU tensors through
Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels are defined).

No op has a kernel here yet: the registry reports each one as not implemented."""

from __future__ import annotations

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
