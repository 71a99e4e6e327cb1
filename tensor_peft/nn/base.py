"""The shared base of every adapter layer: wraps a frozen linear, conv, or embedding layer
and keeps its whole geometry (stride, padding including "same"/"valid", dilation, groups,
padding_mode, kernel shape, bias) by calling the base layer itself for the frozen path and
its operation (``F.linear``, ``_conv_forward``, ``F.embedding``) for the updates.

Which layers it wraps is ``layer_kinds.layer_kind``'s answer. Every method sees the weight
in one layout, ``layer.weight``: (out, in, *kernel); for transformers' ``Conv1D`` and
``nn.Embedding`` (a linear map from the one-hot index to the embedding) that is a
transposed view of the stored weight. Quantized linear layers (``tensor_peft.quantized``:
bitsandbytes 4-bit and 8-bit, torchao weights) are wrapped too: their own forward computes
W0·x and every update is added to it; ``layer.weight`` is then W0 dequantized (computed
anew at each read), which only the methods whose update involves W0 read in their forward
(LieRA), and merging quantizes the merged weight again with the layer's own settings.

It holds any number of named adapters of one method, and does what all methods share:
adapter dropout, enable/disable, the active adapters, merge/unmerge (refusing a merge
that would write non-finite values), and the dtype policy: adapter parameters are
float32 over a float16/bfloat16 base unless another dtype is asked for, and the update
is computed in at least float32 before it is added to the base output.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import check_dropout
from ..quantized import RequantizationWarning, quantization_of
from .layer_kinds import layer_kind

_POINTWISE_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def adapter_dtype_for(weight: Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of new adapter parameters: ``dtype`` if given, else float32 over a half
    base, else the base weight's dtype."""
    if dtype is not None:
        return dtype
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class Adapter(nn.Module):
    """One named adapter's parameters and hyper-parameters (one subclass per method)."""

    def __init__(self, dropout: float):
        super().__init__()
        dropout = check_dropout(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def upgrade_saved(self, tensors: dict, prefix: str) -> None:
        """Rename in place the keys (``prefix`` + name) under which an earlier version saved
        this adapter's tensors to today's (none renamed by default). Both loading paths call
        it: ``load_state_dict`` and the adapter files of ``tensor_peft.load_adapter``."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.upgrade_saved(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class WrapsBaseLayer(nn.Module):
    """A module around ``self.base_layer`` whose attributes (``weight``, ``in_channels``,
    ``kernel_size``, ...) read through, so code written for the base layer keeps working."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


class AdapterLayer(WrapsBaseLayer):
    """A frozen base layer plus named adapters of one method.

    Subclasses take their adapters' options, with their defaults, as constructor
    arguments, and implement ``_new_adapter(**options) -> Adapter``, ``delta_weight(adapter)``
    (ΔW in the base weight's layout, float32 or wider) and may override
    ``delta_forward(adapter, x)`` (the update's output for input ``x``; by default
    the base layer's operation with ΔW) and ``merge_weight``/``unmerge_weight``
    (additive by default)."""

    method: str = ""
    no_low_rank_form = "this update is not a low-rank product B·A: peft's LoRA cannot hold it"

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", **options):
        super().__init__()
        self.kind = layer_kind(base_layer)
        self.base_layer = base_layer
        self.quantization = quantization_of(base_layer)
        self.requantized = False  # merged adapters were quantized into the weight (no unmerge)
        self.requantization_error: float | None = None
        self.training = base_layer.training  # in eval mode if the layer it replaces is
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)
        self.adapters = nn.ModuleDict().train(self.training)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.adapters_enabled = True
        self.add_adapter(adapter_name, **options)

    # ------------------------------------------------------------------ geometry

    @property
    def weight(self) -> Tensor:
        """The base weight in the (out, in, *kernel) layout every method works in: the
        stored parameter, or a transposed view of it (``Conv1D``, ``nn.Embedding``); for a
        quantized base, W0 dequantized by its library (a new tensor at each read)."""
        if self.quantization is not None:
            return self.quantization.dequantize(self.base_layer)
        weight = self.base_layer.weight
        return weight if self.kind == "conv" or isinstance(self.base_layer, nn.Linear) else weight.T

    @property
    def weight_shape(self) -> torch.Size:
        """``self.weight.shape``, without dequantizing a quantized base."""
        if self.quantization is not None:
            return torch.Size((self.base_layer.out_features, self.base_layer.in_features))
        return self.weight.shape

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv"

    @property
    def is_embedding(self) -> bool:
        return self.kind == "embedding"

    @property
    def is_grouped_conv(self) -> bool:
        """A conv with groups > 1, whose update runs in merged form (one conv with ΔW)."""
        return self.is_conv and self.base_layer.groups > 1

    @property
    def spatial_dims(self) -> int:
        return self.weight.dim() - 2

    def operation_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the base operation runs in: the input's (an embedding's: its weight's)."""
        return self.base_layer.weight.dtype if self.is_embedding else x.dtype

    def base_operation(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The base layer's operation with another weight (in ``self.weight``'s layout) and
        no bias unless given: conv geometry (padding modes, groups, dilation) and the
        embedding's options come from the base layer, but for ``sparse``: the weights looked
        up here are the adapters' dense tensors (``sparse=True`` asks for a sparse gradient
        of the frozen base weight, which is never computed)."""
        if self.is_conv:
            return self.base_layer._conv_forward(x, weight, bias)
        if self.is_embedding:
            base = self.base_layer
            return F.embedding(x, weight.T, base.padding_idx, None, 2.0, base.scale_grad_by_freq)
        return F.linear(x, weight, bias)

    def whole_weight_rows(self, x: Tensor, weight: Tensor) -> Tensor:
        """The rows of ``weight`` (W0 + ΔW, or ΔW, in ``self.weight``'s layout) that an
        embedding looks up for indices ``x``, without ``padding_idx``: the positions of the
        padding index train the update's padding row, as they train LoRA's B (peft's rule:
        the padding row moves); W0 itself is frozen."""
        return F.embedding(x, weight.T, None, None, 2.0, self.base_layer.scale_grad_by_freq)

    def weight_gradient(self, x: Tensor, grad: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
        """∂⟨grad, op(x, V)⟩/∂V for the base operation (groups = 1) with a weight V of
        ``weight_shape`` (any channel counts): the weight gradient alone, without running
        the operation. Padding modes and "same" are applied to x first, as the base does."""
        if not self.is_conv:
            return grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        base = self.base_layer
        if x.dim() == self.spatial_dims + 1:  # unbatched input
            x, grad = x.unsqueeze(0), grad.unsqueeze(0)
        padding = base.padding
        if base.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if base.padding_mode == "zeros" else base.padding_mode
            x, padding = F.pad(x, base._reversed_padding_repeated_twice, mode=mode), 0
        return _CONV_WEIGHT_GRAD[self.spatial_dims](x, weight_shape, grad, base.stride, padding, base.dilation)

    def operation_with_weight(self, x: Tensor, make_weight: Callable[[], Tensor]) -> Tensor:
        """The base operation (with the bias) and the weight ``make_weight()`` gives, which
        autograd does not keep for backward: it is made again there, so that a merged path
        keeps nothing of the weight's size (training memory as LoRA's)."""
        weight = make_weight()
        with recomputed_in_backward(weight, make_weight):
            return self.base_operation(x, weight, self.bias)

    def operation_with_dequantized_weight(self, x: Tensor, make_weight: Callable[[Tensor], Tensor]) -> Tensor:
        """The base operation (no bias) with the weight ``make_weight(W0)`` gives from the
        dequantized W0 of a quantized base, in ``x``'s dtype. Autograd keeps neither W0 nor
        that weight for backward: both are made again there, so a layer holds no
        dequantized copy of its weight after the forward."""

        def dequantized() -> Tensor:
            return self.weight.to(x.dtype)

        base = dequantized()
        with recomputed_in_backward(base, dequantized):
            weight = make_weight(base)
        with recomputed_in_backward(weight, lambda: make_weight(dequantized())):
            return self.base_operation(x, weight)

    def pointwise(self, x: Tensor, matrix: Tensor) -> Tensor:
        """Channel mixing by ``matrix`` (out, in): a 1×1 conv for conv inputs, linear otherwise."""
        if self.is_conv:
            kernel = matrix.reshape(*matrix.shape, *[1] * self.spatial_dims)
            return _POINTWISE_CONV[self.spatial_dims](x, kernel)
        return F.linear(x, matrix)

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, **options) -> None:
        """Add adapter ``name`` (initialized so that the layer's output does not change)
        and make it active. ``options`` are the layer's constructor arguments; those not
        given take the constructor's defaults."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"adapter_name must be a Python identifier, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        adapter = self._new_adapter(**{**self.option_defaults(), **options})
        if self.is_embedding and not isinstance(adapter.dropout, nn.Identity):
            raise ValueError("dropout must be 0 on an nn.Embedding: its inputs are indices")
        self.adapters[name] = adapter.to(self.base_layer.weight.device).train(self.training)
        self.active_adapters = [name]

    @classmethod
    def option_defaults(cls) -> dict[str, object]:
        """The adapter options the constructor takes, with their defaults."""
        parameters = inspect.signature(cls.__init__).parameters
        return {name: p.default for name, p in parameters.items() if name not in ("self", "base_layer", "adapter_name")}

    def _new_adapter(self, **options) -> Adapter:
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        self.check_delete(name)
        del self.adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def check_delete(self, name: str) -> None:
        """Raises unless ``delete_adapter(name)`` may run: a known adapter, not merged."""
        self._check_adapter(name)
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged: unmerge it before deleting it")

    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` the active adapters. A merged adapter stays active until unmerged."""
        names = [names] if isinstance(names, str) else list(names)
        self.check_switch(names)
        self.active_adapters = names

    def check_switch(self, names: list[str]) -> None:
        """Raises unless ``set_adapter(names)`` may run: known names, none merged left out."""
        for name in names:
            self._check_adapter(name)
        dropped = [name for name in self.merged_adapters if name not in names]
        if dropped:
            raise ValueError(f"adapter {dropped[0]!r} is merged into the weight: unmerge it before switching adapters")

    def _check_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise ValueError(f"no adapter {name!r} on this layer (it has {list(self.adapters)})")

    def enable_adapters(self, enabled: bool = True) -> None:
        """Switch the adapters on or off; a merged adapter cannot be switched off."""
        if not enabled and self.merged_adapters:
            raise ValueError(
                f"adapters {self.merged_adapters} are merged into the weight: unmerge before "
                "disabling adapters"
            )
        self.adapters_enabled = enabled

    # ------------------------------------------------------------------ math

    def delta_weight(self, adapter: Adapter) -> Tensor:
        raise NotImplementedError

    def delta_forward(self, adapter: Adapter, x: Tensor) -> Tensor:
        return self.base_operation(x, self.delta_weight(adapter))

    def low_rank_form(self, adapter: Adapter) -> tuple[Tensor, Tensor, float]:
        """(down ``(r, *weight.shape[1:])``, up ``(out, r)``, scale) with ΔW = scale·up·down
        exactly (peft's LoRA form), or a ValueError saying why the method has none."""
        raise ValueError(self.no_low_rank_form)

    def compute_dtype(self, adapter: Adapter) -> torch.dtype:
        """At least float32, and the adapter parameters' dtype if wider."""
        dtype = next(adapter.parameters()).dtype
        return torch.promote_types(dtype, torch.float32)

    def single_active_adapter(self) -> Adapter | None:
        """The adapter when the layer may run as one conv/linear with its effective weight:
        exactly one active adapter, none merged, adapters on, its dropout a no-op, and the
        base not quantized (whose own forward computes W0·x)."""
        if len(self.active_adapters) != 1 or self.merged_adapters or not self.adapters_enabled:
            return None
        if self.quantization is not None:
            return None
        adapter = self.adapters[self.active_adapters[0]]
        if self.training and not isinstance(adapter.dropout, nn.Identity):
            return None
        return adapter

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x) if self.quantization is None else self.quantization.forward(self.base_layer, x)
        if not self.adapters_enabled:
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            adapter = self.adapters[name]
            result = result + self.delta_forward(adapter, self.adapter_input(adapter, x)).to(result.dtype)
        return result

    def adapter_input(self, adapter: Adapter, x: Tensor) -> Tensor:
        """``x`` as the update sees it: through the adapter's dropout, in its compute dtype
        (an embedding's indices as they are)."""
        return x if self.is_embedding else adapter.dropout(x).to(self.compute_dtype(adapter))

    def effective_weight(self) -> Tensor:
        """The base weight with every active, unmerged adapter applied in turn, with
        gradients to the adapters: for a module that reads the weight itself (the
        projections of ``nn.MultiheadAttention``)."""
        weight = self.weight
        if self.adapters_enabled:
            for name in self.active_adapters:
                if name not in self.merged_adapters:
                    weight = self.merge_weight(self.adapters[name], weight)
        return weight

    # ------------------------------------------------------------------ merging

    def merge_weight(self, adapter: Adapter, weight: Tensor) -> Tensor:
        """The weight with the adapter folded in (computed in float32 or wider)."""
        return weight + self.delta_weight(adapter)

    def unmerge_weight(self, adapter: Adapter, weight: Tensor) -> Tensor:
        return weight - self.delta_weight(adapter)

    def pending_merge(self) -> bool:
        """Whether ``merge()`` would write the weight: an active adapter is not merged yet."""
        return any(name not in self.merged_adapters for name in self.active_adapters)

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, check_only: bool = False, dequantized: bool = False) -> None:
        """Fold the active (or the named) adapters into the base weight. All or nothing:
        refuses, leaving the weight untouched, while the adapters are disabled (the
        output would change, and ``enable_adapters`` could not switch them off again), or
        where the result would not be finite in the weight's dtype or could not be
        unmerged again (``merge_refusal``).
        A quantized base gets the merged weight quantized again with its own settings
        (``requantize``, which warns with the rounding error); it cannot be unmerged then.
        ``check_only`` runs the checks without writing; with ``dequantized`` those of a merge
        into the dequantized weight (``unload(dequantize=True)``)."""
        names = self.active_adapters if names is None else names
        for name in names:
            self._check_adapter(name)
        pending = [name for name in dict.fromkeys(names) if name not in self.merged_adapters]
        if pending and not self.adapters_enabled:
            raise ValueError(
                "adapters are disabled: enable them before merging (a merged adapter cannot be disabled), "
                "or unload with merge=False"
            )
        if not pending:
            return
        weight = self.weight
        for name in pending:
            weight = self._checked(self.merge_weight, name, weight, "merge")
        if self.quantization is not None and not dequantized:
            reason = self.quantization.requantize_refusal(self.base_layer)
            if reason:
                raise ValueError(
                    f"cannot merge into this {self.quantization.name} layer: {reason}; unload(merge=True, "
                    "dequantize=True) merges into a full-precision layer instead"
                )
        if check_only:
            return
        if self.quantization is None:
            self.weight.copy_(weight)
        else:
            self.requantize(weight)
        self.merged_adapters.extend(pending)

    def requantize(self, weight: Tensor) -> None:
        """Quantize ``weight`` into the quantized base with its own settings and warn with
        the relative error (Frobenius) of the weight it then holds."""
        self.quantization.requantize(self.base_layer, weight)
        self.requantized = True
        error = float(torch.linalg.norm(self.weight.double() - weight.double()) / torch.linalg.norm(weight.double()))
        self.requantization_error = error
        warnings.warn(
            f"the merged weight was quantized again into the {self.quantization.name} layer: it differs from "
            f"W0 + ΔW by {error:.3g} (relative)",
            RequantizationWarning,
            stacklevel=2,
        )

    def dequantize_base(self) -> None:
        """Replace a quantized base layer by an ``nn.Linear`` holding its dequantized
        weight (and any merged adapters)."""
        self.base_layer = self.quantization.full_precision(self.base_layer, self.weight)
        self.quantization = None

    @torch.no_grad()
    def unmerge(self, check_only: bool = False) -> None:
        """Take every merged adapter out of the base weight again (last merged first).
        All or nothing, as ``merge``. Refused after a merge into a quantized base, whose
        rounding cannot be undone."""
        if self.requantized and self.merged_adapters:
            raise ValueError(
                f"adapters {self.merged_adapters} were merged into a quantized weight and quantized again: that "
                "rounding cannot be undone, so they cannot be unmerged (load the base model again to remove them)"
            )
        if not self.merged_adapters:
            return
        weight = self.weight
        for name in reversed(self.merged_adapters):
            weight = self._checked(self.unmerge_weight, name, weight, "unmerge")
        if self.merged_adapters and not check_only:
            self.weight.copy_(weight)
            self.merged_adapters.clear()

    def _checked(self, transform, name: str, weight: Tensor, action: str) -> Tensor:
        """``transform(adapter, weight)`` computed in float32 or wider and rounded to the
        weight's dtype, or a ValueError saying why it may not be written."""
        wide = weight.to(torch.promote_types(weight.dtype, self.compute_dtype(self.adapters[name])))
        result = transform(self.adapters[name], wide).to(weight.dtype)
        reason = self.merge_refusal(weight, result)
        if reason:
            raise ValueError(f"cannot {action} adapter {name!r}: {reason}; the weight is left unchanged")
        return result

    def merge_refusal(self, weight: Tensor, result: Tensor) -> str | None:
        """Why ``result`` may not replace ``weight``, or None: non-finite values."""
        if not torch.isfinite(result).all():
            return f"the weight would hold non-finite values in {result.dtype}"
        return None

    def extra_repr(self) -> str:
        return f"method={self.method}, adapters={list(self.adapters)}, active={self.active_adapters}"


@contextlib.contextmanager
def recomputed_in_backward(tensor: Tensor, recompute: Callable[[], Tensor]) -> Iterator[None]:
    """Autograd, inside this block, keeps no copy of ``tensor`` (nor of a view of it) for
    backward: it keeps the view's geometry and calls ``recompute()`` (which must return
    ``tensor``'s values again) when backward needs it. Memory only: the math is unchanged.
    Under torch.compile the block is a no-op (the compiler makes its own choices)."""
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        yield
        return
    # plain values, not the tensor: autograd keeps the hooks, and they must not keep it alive
    # (its address cannot be reused while the block runs: the caller holds the tensor)
    device, address = tensor.device, tensor.untyped_storage().data_ptr()

    def pack(saved: Tensor):
        if saved.device == device and saved.untyped_storage().data_ptr() == address:
            return _Recompute(saved.size(), saved.stride(), saved.storage_offset())
        return saved

    def unpack(packed):
        if isinstance(packed, _Recompute):
            with torch.no_grad():
                return recompute().as_strided(packed.size, packed.stride, packed.offset)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _Recompute:
    """A saved tensor left out: the geometry of the view of the recomputed tensor."""

    def __init__(self, size, stride, offset):
        self.size, self.stride, self.offset = size, stride, offset
