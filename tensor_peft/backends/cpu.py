"""The ``cpu`` backend: C++17/OpenMP kernels of the compiled extension ``tensor_peft._C``.

No op has a kernel here yet: the registry reports each one as not implemented."""

from __future__ import annotations

from .registry import extension_import_error

DEVICE_TYPES = ("cpu",)


def unavailable_reason(device_type: str) -> str | None:
    return extension_import_error("_C")
