"""What every op shares: input checks, the dtype policy, and the op's registration
(``custom_op``, ``register_backward``): an op file holds its schema, its fake and its
math, which calls its backend by ``registry.run``.

Dtype policy: inputs may mix floating dtypes; an op computes in the widest of them and
at least float32 (its compute dtype), returns its result in the dtype of its main input,
and each gradient comes back in its own input's dtype. The public wrappers hand the
registered ``torch.library`` ops contiguous tensors on one device, by ``prepare``: a
float16/bfloat16 tensor stays in its dtype when the backend that will run the op takes it
(``registry.kernel_dtypes``: the triton and cuda backends' kernels read and write half
tensors, computing in float32 and rounding each result once); every other tensor is cast to the
compute dtype, so that a backend that takes float32/float64 only sees one dtype. The casts
are ordinary differentiable ``Tensor.to`` calls. Under torch.compile (where the backend is
chosen only when the graph runs) every tensor is cast: the same values either way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ..backends import registry
from ..backends.tensor_algebra import compute_dtype
from ..config import FLOAT_DTYPES, HALF_DTYPES

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


def prepare(op: str | None, *tensors: Tensor) -> list[Tensor]:
    """``tensors`` contiguous, each float16/bfloat16 one in its own dtype if the backend
    that runs ``op`` on their device takes it, the others in their ``compute_dtype`` (all
    of them when ``op`` is None); both steps differentiable."""
    dtype = compute_dtype(*tensors)
    halves = op is not None and any(tensor.dtype in HALF_DTYPES for tensor in tensors)
    taken = _half_dtypes_taken(op, tensors[0].device) if halves else ()
    return [(tensor if tensor.dtype in taken else tensor.to(dtype)).contiguous() for tensor in tensors]


def _half_dtypes_taken(op: str, device: torch.device) -> tuple[torch.dtype, ...]:
    """The half dtypes the backend selected for ``op`` on ``device`` takes; none under
    torch.compile or when no backend can run there (nothing runs, or the op raises why)."""
    if torch.compiler.is_compiling():
        return ()
    try:
        name, _ = registry.select(op, device.type)
    except registry.BackendUnavailableError:
        return ()
    return tuple(dtype for dtype in registry.kernel_dtypes(name) if dtype in HALF_DTYPES)


def custom_op(name: str, fake: Callable, schema: str | None = None) -> Callable[[Callable], torch.library.CustomOpDef]:
    """Decorator: the function below as the ``torch.library`` op ``tensor_peft::<name>``
    (cpu and cuda tensors; meta and fake tensors through ``fake``, which gives the outputs'
    shapes), its schema ``schema`` or else read from the function's annotations."""

    def define(implementation: Callable) -> torch.library.CustomOpDef:
        op = torch.library.custom_op(
            f"tensor_peft::{name}", implementation, mutates_args=(), device_types=("cpu", "cuda"), schema=schema
        )
        op.register_fake(fake)
        return op

    return define


def register_backward(op: torch.library.CustomOpDef, backend_op: str, setup_context: Callable,
                      backward: Callable) -> None:  # fmt: skip
    """``op``'s autograd: ``setup_context(ctx, inputs, output)`` keeps on ``ctx`` what
    ``backward(ctx, *grads)`` needs. The backend that runs the forward's ``backend_op`` (a
    registry op, on the device of the first tensor input) is recorded with it, and the
    backward runs there: after a ``backends.use`` block has ended, or on another thread."""

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        record_backend(ctx, backend_op, next(value for value in inputs if isinstance(value, Tensor)).device)

    def backward_on_the_forward_backend(ctx, *grads):
        with forward_backend(ctx):
            return backward(ctx, *grads)

    op.register_autograd(backward_on_the_forward_backend, setup_context=setup)


def record_backend(ctx, op: str, device: torch.device) -> None:
    """Keep on ``ctx`` the backend that runs the forward ``op`` on ``device`` now (in this
    thread and context), for ``forward_backend``: ``register_backward``'s, or an
    autograd.Function's."""
    try:
        ctx.backend = registry.select(op, device.type)[0]
    except registry.BackendUnavailableError:
        ctx.backend = None  # nothing ran (shapes only): the backward selects, and says why it cannot


def forward_backend(ctx):
    """A context in which ops run on the backend recorded with the forward."""
    return contextlib.nullcontext() if ctx.backend is None else registry.use(ctx.backend)
