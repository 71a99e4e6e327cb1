"""Backends that run the ops: ``reference`` (pure torch, the ops' definitions made executable), ``cpu``
(C++/OpenMP extension ``tensor_peft._C``), ``triton``, ``cuda`` (CUDA C++ extension
``tensor_peft._cuda``) and ``cuda_emulated`` (the same CUDA kernels on CPU tensors under an
emulation of CUDA, ``tensor_peft._cuda_emulated``; built with TENSOR_PEFT_CUDA_EMULATION=1,
run only when asked for). Pick one with ``use(name)`` or ``TENSOR_PEFT_BACKEND``; see
``registry`` for the selection rules."""

from .registry import (
    ENV_VAR,
    NAMES,
    BackendUnavailableError,
    available,
    implemented_ops,
    requested,
    use,
    why_unavailable,
)

__all__ = [
    "ENV_VAR",
    "NAMES",
    "BackendUnavailableError",
    "available",
    "implemented_ops",
    "requested",
    "use",
    "why_unavailable",
]
