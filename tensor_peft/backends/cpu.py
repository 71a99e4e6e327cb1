"""The ``cpu`` backend: C++17/OpenMP kernels of the compiled extension ``tensor_peft._C``.

No op has a kernel here yet: the registry reports each one as not implemented."""

from __future__ import annotations

DEVICE_TYPES = ("cpu",)


def unavailable_reason(device_type: str) -> str | None:
    try:
        from tensor_peft import _C  # noqa: F401
    except ImportError as error:
        return f"the extension tensor_peft._C is not built or does not load ({error})"
    return None
