"""Which backends exist, which can run here (and why not), and which one runs an op.

A backend is a module of this package exposing ``DEVICE_TYPES`` (the tensor device
types it serves) and ``unavailable_reason(device_type)`` (``None`` when it can run). It
implements every op of ``OPS``, each by a function under ``@register(op, backend)`` with
the calling convention of ``reference.py``; importing the module registers them. A
backend whose kernels also take float16/bfloat16 tensors lists the dtypes they take in
``KERNEL_DTYPES`` (read by ``kernel_dtypes``); without it, float32 and float64.

Selection for an op on tensors of a device type: the backend asked for by
``use(name)`` or else by the environment variable ``TENSOR_PEFT_BACKEND``; when none
was asked for, the first backend of the default order that can run on those tensors.
A backend that was asked for but cannot run the op raises
``BackendUnavailableError`` with the reason: it never silently falls back.

Scope of ``use(name)``: the request is held in a ``contextvars.ContextVar``, so it holds in
the thread (or asyncio task) that entered the block, while the block runs. Other threads,
including ones started inside the block and the threads autograd runs GPU backward on,
do not see it: they select by ``TENSOR_PEFT_BACKEND`` or the default order. An op's
backward runs on the backend its forward ran on (the op records it with the forward),
whenever and on whichever thread backward runs. A block entered in a generator may be
left on another thread (the generator resumed there): the request then ends in the
context that entered it, as if the block had ended there.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Callable, Iterator

import torch

from ..config import check_choice

ENV_VAR = "TENSOR_PEFT_BACKEND"
FULL_PRECISION = (torch.float32, torch.float64)
NAMES = ("reference", "cpu", "triton", "cuda", "cuda_emulated")
DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
OPS = (
    "tucker_delta", "tucker_delta_backward", "tucker_merge",
    "matrix_exp", "matrix_exp_backward",
    "sparsify", "sparsify_backward",
    "kernelized_sparse_delta", "kernelized_sparse_delta_backward", "sparse_linear_backward",
    "lowrank_hadamard_merge", "lowrank_hadamard_merge_backward",
    "tucker_projected_backward",
)  # fmt: skip
_KERNELS: dict[tuple[str, str], Callable] = {}  # (op, backend) -> the function that runs it


class _Request:
    """A ``use(name)`` block's request: it holds while the block runs (``active``), then
    the enclosing block's (``outer``) holds again."""

    def __init__(self, name: str, outer: _Request | None):
        self.name, self.outer, self.active = name, outer, True


_requested: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("tensor_peft_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here (the message says why)."""


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: the function below is backend ``backend``'s kernel for ``op`` (one per
    pair; ValueError for an unknown op or backend, or a pair registered twice)."""
    key = (check_choice(op, "op", OPS), check_choice(backend, "backend", NAMES))
    if key in _KERNELS:
        raise ValueError(f"{op} is already registered for backend {backend!r}")

    def add(function: Callable) -> Callable:
        _KERNELS[key] = function
        return function

    return add


@functools.cache
def _module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def kernel_dtypes(name: str) -> tuple[torch.dtype, ...]:
    """The dtypes backend ``name``'s kernels take: its ``KERNEL_DTYPES``, else ``FULL_PRECISION``."""
    return getattr(_module(check_choice(name, "name", NAMES)), "KERNEL_DTYPES", FULL_PRECISION)


def _device_type(device: str | torch.device | None) -> str | None:
    return None if device is None else torch.device(device).type


def _device_types_here() -> tuple[str, ...]:
    """Device types this machine has: always cpu, cuda when torch sees a GPU."""
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


@functools.cache
def _reason_for_device(name: str, device_type: str) -> str | None:
    backend = _module(name)
    if device_type not in backend.DEVICE_TYPES:
        return f"it runs only on {' / '.join(backend.DEVICE_TYPES)} tensors, not {device_type}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return backend.unavailable_reason(device_type)


def why_unavailable(name: str, device: str | torch.device | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (any device of this machine when
    ``None``); ``None`` when it can."""
    check_choice(name, "name", NAMES)
    device_type = _device_type(device)
    if device_type is not None:
        return _reason_for_device(name, device_type)
    reasons = [_reason_for_device(name, d) for d in _device_types_here()]
    if any(r is None for r in reasons):
        return None
    return "; ".join(f"{d}: {r}" for d, r in zip(_device_types_here(), reasons))


def available(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` (any device here when ``None``)."""
    return [name for name in NAMES if why_unavailable(name, device) is None]


def implemented_ops(name: str) -> tuple[str, ...]:
    """The ops (forward and backward) backend ``name`` has registered kernels for: all of
    ``OPS``, or none when its kernels cannot load (Triton missing)."""
    _module(check_choice(name, "name", NAMES))
    return tuple(op for op in OPS if (op, name) in _KERNELS)


def kernel(op: str, name: str) -> Callable:
    """Backend ``name``'s function for ``op``, whether or not it can run on this machine's
    tensors (``select`` picks the one that runs)."""
    _module(check_choice(name, "name", NAMES))
    function = _KERNELS.get((check_choice(op, "op", OPS), name))
    if function is None:
        raise BackendUnavailableError(f"backend {name!r} has no kernels here: {why_unavailable(name)}")
    return function


def requested() -> str | None:
    """The backend asked for by ``use()`` or ``TENSOR_PEFT_BACKEND``; ``None`` for the default order."""
    request = _requested.get()
    while request is not None and not request.active:
        request = request.outer
    if request is not None:
        return request.name
    env = os.environ.get(ENV_VAR, "").strip()
    if env in ("", "auto"):
        return None
    return check_choice(env, f"environment variable {ENV_VAR}", NAMES)


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Run every op inside the ``with`` block on backend ``name`` (overrides
    ``TENSOR_PEFT_BACKEND``), in this thread only (see the module doc); the backward of an
    op run inside runs there too, even after the block. Raises at once if the backend
    cannot run on any device here."""
    reason = why_unavailable(check_choice(name, "name", NAMES))
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")
    request = _Request(name, _requested.get())
    token = _requested.set(request)
    try:
        yield
    finally:
        request.active = False  # ends it in the context that entered the block, wherever the exit runs
        with contextlib.suppress(ValueError):  # left in another context: a generator resumed on another thread
            _requested.reset(token)


def select(op: str, device_type: str) -> tuple[str, Callable]:
    """The backend (name, function) that runs ``op`` on ``device_type`` tensors now."""
    name = requested()
    if name is not None:
        reason = _reason_for_device(name, device_type)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {name!r} was asked for but cannot run {op} on {device_type} "
                f"tensors: {reason}"
            )
        return name, kernel(op, name)
    for name in DEFAULT_ORDER.get(device_type, ("reference",)):
        if _reason_for_device(name, device_type) is None:
            return name, kernel(op, name)
    raise BackendUnavailableError(f"no backend can run {op} on {device_type} tensors")


def run(op: str, device: torch.device, *args):
    """Run ``op`` on the backend ``select`` picks for ``device``, with autocast off: the ops
    compute in the dtype their policy gives them (``tensor_peft.ops._common``), also inside
    an autocast region (whose casts would otherwise reach the torch calls a backend makes)."""
    _, kernel = select(op, device.type)
    if not torch.is_autocast_enabled(device.type):  # entering a region costs as much as a small kernel
        return kernel(*args)
    with torch.autocast(device.type, enabled=False):
        return kernel(*args)
