"""The ``cuda`` backend: CUDA C++ kernels of the compiled extension ``tensor_peft._cuda``.

No op has a kernel here yet: the registry reports each one as not implemented."""

from __future__ import annotations

DEVICE_TYPES = ("cuda",)


def unavailable_reason(device_type: str) -> str | None:
    try:
        from tensor_peft import _cuda  # noqa: F401
    except ImportError as error:
        return f"the extension tensor_peft._cuda is not built or does not load ({error})"
    return None
