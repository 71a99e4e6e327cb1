"""What every op shares: input checks, the dtype policy, and the call into the backend.

Dtype policy: inputs may mix floating dtypes; an op computes in the widest of them and
at least float32 (float16/bfloat16 are upcast), returns its result in the dtype of its
main input, and each gradient comes back in its own input's dtype. The casts happen in
the public wrappers, as ordinary differentiable ``Tensor.to`` calls, so the registered
``torch.library`` ops and the backends see contiguous float32 or float64 tensors of one
dtype on one device. One exception: ``tucker_merge`` passes a float16/bfloat16 weight in
its own dtype (the frozen weight, read and written once; see that op).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import Tensor

from ..backends import registry
from ..config import FLOAT_DTYPES
DEVICE_TYPES = ("cpu", "cuda", "meta")  # meta: shapes only, through the fake impls


def check_tensor(value: object, name: str, *, ndim: int | None = None, min_ndim: int = 0) -> Tensor:
    """``value`` as a floating tensor on a supported device, or a TypeError/ValueError naming ``name``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}"
        )
    if value.device.type not in DEVICE_TYPES:
        raise ValueError(f"{name} must be on a cpu, cuda or meta device, got {value.device}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if value.dim() < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions, got shape {tuple(value.shape)}"
        )
    return value


def check_same_device(tensors: Mapping[str, Tensor]) -> None:
    """All named tensors on one device, or a ValueError naming the odd one."""
    (first_name, first), *rest = tensors.items()
    for name, tensor in rest:
        if tensor.device != first.device:
            raise ValueError(
                f"{name} is on {tensor.device} but {first_name} is on {first.device}: "
                "all inputs must be on one device"
            )


def check_frozen(weight: Tensor, name: str = "weight") -> None:
    """The merge ops give the base weight no gradient: refuse one that asks for it."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad, but this op gives it no gradient (the base weight is "
            "frozen): pass weight.detach() or set requires_grad=False"
        )


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The widest dtype among ``tensors``, at least float32."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def prepare(*tensors: Tensor) -> list[Tensor]:
    """``tensors`` in their ``compute_dtype`` and contiguous, both steps differentiable."""
    dtype = compute_dtype(*tensors)
    return [tensor.to(dtype).contiguous() for tensor in tensors]


def run(op: str, device: torch.device, *args):
    """Run ``op`` on the backend the registry selects for ``device``, with autocast off:
    the ops compute in the dtype the policy above gives them, also inside an autocast
    region (whose casts would otherwise reach the torch calls a backend makes)."""
    _, kernel = registry.select(op, device.type)
    if not torch.is_autocast_enabled(device.type):  # entering a region costs as much as a small kernel
        return kernel(*args)
    with torch.autocast(device.type, enabled=False):
        return kernel(*args)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def runs_eagerly(*tensors: Tensor | None) -> bool:
    """Whether a custom op's Python implementation may be called directly instead of the
    registered op, skipping the dispatcher (tens of µs a call, as much as a small layer's
    kernels): in eager mode, on plain tensors (and parameters) on a real device.
    torch.compile, tensor subclasses (fake, functional, DTensor) and meta tensors need the
    registered op."""
    return not torch.compiler.is_compiling() and all(
        tensor is None or (type(tensor) in _PLAIN_TENSORS and not tensor.is_meta) for tensor in tensors
    )


def record_backend(ctx, op: str, device: torch.device) -> None:
    """Keep on ``ctx`` the backend that ran the forward ``op`` (selected in this thread and
    context now, as the forward just was), so that ``forward_backend`` runs the backward
    there: after a ``backends.use`` block has ended, or on another thread."""
    try:
        ctx.backend = registry.select(op, device.type)[0]
    except registry.BackendUnavailableError:
        ctx.backend = None  # nothing ran (shapes only): the backward selects, and says why it cannot


def forward_backend(ctx):
    """A context in which ops run on the backend recorded by ``record_backend``."""
    return contextlib.nullcontext() if ctx.backend is None else registry.use(ctx.backend)
