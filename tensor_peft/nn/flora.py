"""FLoRA: the update of an N-D weight is a Tucker decomposition (Si et al., ICLR 2025),
ΔW = s · G ×_0 U_0 ×_1 U_1 … with axes in the weight's own order (out, in/groups,
spatial…). Init: G = 0, U_k ~ N(0, 1/(2 r_k)), so ΔW = 0 and only G moves at step 1.

Execution per layer (``execution``):
- ``merged``: W_eff = W0 + ΔW by the fused ``ops.tucker_merge``, then one conv/linear
  with W_eff (the base layer's geometry, groups and padding modes included). Its backward
  (groups = 1) never forms the dense weight gradient Γ when a projected one is cheaper:
  the adapter's gradients need only Γ ×_0 U_0ᵀ and Γ ×_1 U_1ᵀ, two thin weight gradients
  (x against U_0ᵀ·grad, U_1ᵀ·x against grad) at r/c of Γ's cost each;
- ``factorized`` (groups = 1): Linear s·U_0(G(U_1ᵀx)); conv: a 1×1 conv by U_1ᵀ
  (c_in→r_1), the small conv K = G ×_2 U_2 ×_3 U_3 … (r_0×r_1×kernel) with the base
  geometry, a 1×1 conv by U_0 (r_0→c_out). Exactly conv(x, ΔW), never building ΔW;
- ``auto``: the faster of the two, timed on this machine (``choose_execution``): at first
  use per layer geometry, ranks, input shape, dtypes, device and grad mode, both paths run
  a few training steps (forward + backward) on a copy of the input, and the faster one is
  cached in this module for every later call (as cuDNN's benchmark mode does). Timing
  makes the choice, and so the output's last bits, depend on the machine's load: with
  ``AUTOTUNE = False`` (its default is False when the environment variable
  ``TENSOR_PEFT_FLORA_AUTOTUNE`` is ``0``, so that subprocesses and every rank of a
  distributed run agree), under ``torch.use_deterministic_algorithms(True)``, on the meta
  device (``init_empty_weights``, FSDP's deferred init: nothing runs to be timed) and while
  torch.compile traces a layer whose choice is not cached yet, a flops + bytes cost model
  (``step_costs``) chooses instead. The last choice is in ``layer.last_execution``;
  ``clear_execution_cache()`` forgets the timed choices.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
import warnings

import torch
from torch import Tensor, nn

from .. import ops
from ..config import EXECUTIONS, check_choice, check_rank
from ..ops.tucker_delta import tucker_projected_backward
from .base import Adapter, AdapterLayer, adapter_dtype_for

PATHS = tuple(execution for execution in EXECUTIONS if execution != "auto")
"""The two ways a layer runs (merged, factorized); execution ``auto`` chooses one of them."""
MACS_PER_BYTE = 8
"""The cost model's machine balance: multiply-adds per byte moved, a CPU's float32 matmul
rate over its copy bandwidth (the benchmarks measure both: the floors of
``benchmarks/results/cpu-*.md``). Only its order of magnitude decides between the two paths."""

AUTOTUNE = os.environ.get("TENSOR_PEFT_FLORA_AUTOTUNE", "1") != "0"
"""Whether execution ``auto`` times the two paths (True) or uses the cost model (False)."""
AUTOTUNE_REPEATS = 3
_execution_cache: dict[tuple, str] = {}


def clear_execution_cache() -> None:
    """Forget every timed choice of execution ``auto`` (the next call of each layer times again)."""
    _execution_cache.clear()


def default_ranks(weight: Tensor, r: int) -> list[int]:
    """[r, r] for Linear, [r, r, 2, …] (2 per spatial axis) for conv."""
    return [r, r] + [2] * (weight.dim() - 2)


def clip_ranks(ranks: list[int], shape: torch.Size) -> list[int]:
    """Ranks larger than their axis's size are clipped to it, with a warning."""
    clipped = [min(r, d) for r, d in zip(ranks, shape)]
    if clipped != list(ranks):
        warnings.warn(f"FLoRA ranks {list(ranks)} exceed the weight's shape {tuple(shape)}: clipped to {clipped}")
    return clipped


class FLoRAAdapter(Adapter):
    def __init__(self, layer: AdapterLayer, r, ranks, scale, execution, dropout, dtype):
        super().__init__(dropout)
        shape = layer.weight.shape
        ranks = default_ranks(layer.weight, check_rank(r)) if ranks is None else [check_rank(k, "ranks") for k in ranks]
        if len(ranks) != len(shape):
            raise ValueError(f"ranks must give one rank per weight mode ({len(shape)}), got {list(ranks)}")
        check_choice(execution, "execution", EXECUTIONS)
        if execution == "factorized" and layer.is_grouped_conv:
            raise ValueError("execution 'factorized' needs groups == 1; grouped convs run merged")
        self.ranks = clip_ranks(ranks, shape)
        self.scale = float(scale)
        self.execution = execution
        factory = dict(dtype=adapter_dtype_for(layer.weight, dtype), device=layer.weight.device)
        self.core = nn.Parameter(torch.zeros(self.ranks, **factory))
        self.factors = nn.ParameterList(
            nn.Parameter(torch.randn(d, k, **factory) * math.sqrt(1 / (2 * k))) for d, k in zip(shape, self.ranks)
        )


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A region with autocast off on ``device``; none on the meta device, which autocast
    does not know (and where nothing is computed)."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


class _ProjectedTuckerGradients(torch.autograd.Function):
    """The identity on the merged path's output ``y``; its backward passes the output
    gradient on and gives the adapter's gradients from it and the layer input by
    ``FLoRALayer.projected_gradients`` (the conv/linear ran with a detached W_eff, so
    autograd computes only its input gradient)."""

    @staticmethod
    def forward(ctx, y, x, layer, scale, core, *factors):
        ctx.save_for_backward(x, core, *factors)
        ctx.layer, ctx.scale = layer, scale
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        x, core, *factors = ctx.saved_tensors
        with _autocast_off(x.device):  # computed in the core's dtype, as a backward inside autocast would not
            gradients = ctx.layer.projected_gradients(x, grad, core, factors, ctx.scale)
        return grad, None, None, None, *gradients


class FLoRALayer(AdapterLayer):
    """A frozen Linear/Conv1d/Conv2d/Conv3d with FLoRA (Tucker) adapters (drop-in replacement)."""

    method = "flora"

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        ranks: list[int] | None = None,
        scale: float = 1.0,
        execution: str = "auto",
        dropout: float = 0.0,
        adapter_name: str = "default",
        dtype: torch.dtype | None = None,
    ):
        self.last_execution: str | None = None
        super().__init__(
            base_layer, adapter_name, r=r, ranks=ranks, scale=scale, execution=execution, dropout=dropout, dtype=dtype
        )

    def _new_adapter(self, **options) -> Adapter:
        if options["execution"] == "merged" and self.quantization is not None:
            raise ValueError("execution 'merged' needs the weight W0 itself; over a quantized base FLoRA runs factorized")
        return FLoRAAdapter(self, **options)

    def _params(self, adapter: Adapter, dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
        return adapter.core.to(dtype), [f.to(dtype) for f in adapter.factors]

    def delta_weight(self, adapter: Adapter) -> Tensor:
        core, factors = self._params(adapter, self.compute_dtype(adapter))
        return ops.tucker_delta(core, factors, adapter.scale)

    def low_rank_form(self, adapter: Adapter) -> tuple[Tensor, Tensor, float]:
        """ΔW = U_0 · (s·R) with R = G ×_1 U_1 ×_2 U_2 … (every axis but the first folded
        into the core): rank r_0, exact. A grouped conv's ΔW has no such form in peft."""
        if self.is_grouped_conv:
            raise ValueError("a grouped conv's FLoRA update has no peft LoRA form")
        core, (U0, *others) = adapter.core, list(adapter.factors)
        eye = torch.eye(core.shape[0], dtype=core.dtype, device=core.device)
        return ops.tucker_delta(core, [eye, *others], adapter.scale), U0, 1.0

    def merge_weight(self, adapter: Adapter, weight: Tensor) -> Tensor:
        core, factors = self._params(adapter, self.compute_dtype(adapter))
        return ops.tucker_merge(weight, core, factors, adapter.scale)

    def projected_gradients(self, x: Tensor, grad: Tensor, core: Tensor, factors: list[Tensor], scale: float):
        """[dG, dU_0, dU_1, …] of the merged path from the output gradient, by the op
        ``tucker_projected_backward`` on the projections T_0 = Γ ×_0 U_0ᵀ, T_1 = Γ ×_1 U_1ᵀ
        and T_01 = T_0 ×_1 U_1ᵀ of the weight gradient Γ (which is never formed)."""
        dtype = core.dtype
        x, grad = x.to(dtype), grad.to(dtype)
        U0, U1 = factors[:2]
        r0, r1 = core.shape[:2]
        kernel = tuple(self.weight.shape[2:])
        # T_1 = Γ ×_1 U_1ᵀ: the weight gradient of U_1ᵀx; T_0 = Γ ×_0 U_0ᵀ: that of x against U_0ᵀ·grad
        T1 = self.weight_gradient(self.pointwise(x, U1.T), grad, (U0.shape[0], r1, *kernel))
        T0 = self.weight_gradient(x, self.pointwise(grad, U0.T), (r0, U1.shape[0], *kernel))
        T01 = torch.tensordot(T0, U1, dims=([1], [0])).movedim(-1, 1)
        return tucker_projected_backward(T0, T1, T01, core, factors, scale)

    def projects_gradients(self, adapter: Adapter) -> bool:
        """Whether the merged path's backward takes the projected weight gradients (groups
        = 1 and cheaper than Γ: c_out·r_1 + r_0·c_in < c_out·c_in per kernel tap)."""
        if self.is_embedding or self.is_grouped_conv:
            return False
        r0, r1 = adapter.ranks[:2]
        c_out, c_in = self.weight.shape[:2]
        return c_out * r1 + r0 * c_in < c_out * c_in

    def choose_execution(self, adapter: Adapter, x: Tensor) -> str:
        """``merged`` or ``factorized`` for this input: the adapter's execution, or under
        ``auto`` the path timed faster for this layer and input (cached), or the cost
        model's choice when timing is off, deterministic algorithms are asked for, the
        input is on the meta device, or torch.compile traces an uncached case."""
        if adapter.execution != "auto":
            return adapter.execution
        if self.is_embedding:
            return "factorized"  # a lookup of the indices' rows, never forming ΔW
        if self.is_grouped_conv:
            return "merged"
        if not AUTOTUNE or torch.are_deterministic_algorithms_enabled() or x.device.type == "meta":
            return self.cheaper_by_cost_model(adapter, x)  # a meta tensor (deferred init) has no time to measure
        key = self.execution_key(adapter, x)
        choice = _execution_cache.get(key)
        if choice is None:
            if torch.compiler.is_compiling():
                return self.cheaper_by_cost_model(adapter, x)
            seconds = time_executions(self, adapter, x)
            choice = _execution_cache[key] = min(PATHS, key=seconds.__getitem__)
        return choice

    def execution_key(self, adapter: Adapter, x: Tensor) -> tuple:
        """What the timed choice depends on: the layer's type, weight and geometry, the
        ranks, the input's shape, dtype and device, the adapter's dtype, grad mode and
        autocast. A Linear's input counts by its rows rounded up to a power of two, so
        that varying sequence lengths share a few timings."""
        base = self.base_layer
        geometry = (base.stride, base.padding, base.dilation, base.padding_mode) if self.is_conv else ()
        if self.is_conv:
            shape = tuple(x.shape)
        else:
            rows = x.numel() // x.shape[-1]
            shape = (1 << max(rows - 1, 0).bit_length(), x.shape[-1])
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        device_type = x.device.type
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return (
            type(base), tuple(self.weight.shape), self.weight.dtype, geometry, base.bias is not None,
            tuple(adapter.ranks), shape, x.dtype, x.requires_grad, str(x.device), adapter.core.dtype,
            trains, autocast,
        )  # fmt: skip

    def cheaper_by_cost_model(self, adapter: Adapter, x: Tensor) -> str:
        merged, factorized = self.step_costs(adapter, x)
        return "factorized" if factorized <= merged else "merged"

    def step_costs(self, adapter: Adapter, x: Tensor) -> tuple[float, float]:
        """Extra cost of a training step (forward + backward) over the frozen base layer,
        in multiply-adds + MACS_PER_BYTE·bytes, for the merged and factorized paths."""
        weight_numel = self.weight.numel()
        r0, r1 = adapter.ranks[:2]
        c_out, c_in = self.weight.shape[:2]
        kernel = math.prod(self.weight.shape[2:])
        rows_in = x.numel() // (x.shape[1] if self.is_conv else x.shape[-1])
        rows_out = self.output_positions(x)
        element = x.element_size()
        # merged: W_eff and the Tucker backward (~r0 MACs per weight element, 4 passes), and
        # the weight gradient the frozen base never runs: the dense Γ (reads x and the output
        # gradient), or its two projections (each reads both, plus the thin projections)
        merged_macs = 2 * weight_numel * r0
        merged_bytes = 4 * weight_numel * element
        if self.projects_gradients(adapter):
            merged_macs += rows_out * (c_out * r1 + r0 * c_in) * kernel + rows_in * c_in * r1 + rows_out * c_out * r0
            merged_bytes += 2 * (rows_in * (c_in + r1) + rows_out * (c_out + r0)) * element
        else:
            merged_macs += rows_out * weight_numel
            merged_bytes += (rows_in * c_in + rows_out * c_out) * element
        # factorized: three thin maps (c_in→r1, r1→r0 with the kernel, r0→c_out), each run
        # forward, input-backward and weight-backward (~5 passes over its input and output),
        # and the sum with the base output (3 passes)
        factorized_macs = 3 * (rows_in * c_in * r1 + rows_out * (r1 * r0 * kernel + r0 * c_out))
        channel_passes = rows_in * (c_in + r1) + rows_out * (r1 + r0) + rows_out * (r0 + c_out)
        factorized_bytes = (5 * channel_passes + 3 * rows_out * c_out) * element
        return (
            float(merged_macs + MACS_PER_BYTE * merged_bytes),
            float(factorized_macs + MACS_PER_BYTE * factorized_bytes),
        )

    def output_positions(self, x: Tensor) -> int:
        """Batch × output spatial positions (rows of the matmul for Linear)."""
        if not self.is_conv:
            return x.numel() // x.shape[-1]
        base = self.base_layer
        positions = x.shape[0]
        for axis, size in enumerate(x.shape[2:]):
            if base.padding == "same":
                positions *= size
                continue
            padding = 0 if base.padding == "valid" else base.padding[axis]
            span = base.dilation[axis] * (base.kernel_size[axis] - 1) + 1
            positions *= (size + 2 * padding - span) // base.stride[axis] + 1
        return positions

    def delta_forward(self, adapter: Adapter, x: Tensor) -> Tensor:
        if self.is_grouped_conv:
            return super().delta_forward(adapter, x)  # conv(x, ΔW): grouped convs run merged
        core, (U0, U1, *spatial) = self._params(adapter, self.compute_dtype(adapter))
        if self.is_embedding:  # the indices' rows of U_1, then the core
            return adapter.scale * torch.nn.functional.linear(self.base_operation(x, U1.T) @ core.T, U0)
        if not self.is_conv:  # s·G folded into U_1ᵀ (r_0 × in): no (tokens, r_1) map saved for backward
            return torch.nn.functional.linear(self.base_operation(x, (adapter.scale * core) @ U1.T), U0)
        identities = [torch.eye(k, dtype=core.dtype, device=core.device) for k in adapter.ranks[:2]]
        kernel = ops.tucker_delta(core, identities + spatial, 1.0)
        thin = self.base_operation(self.pointwise(x, U1.T), kernel)
        return adapter.scale * self.pointwise(thin, U0)

    def forward(self, x: Tensor) -> Tensor:
        adapter = self.single_active_adapter()
        self.last_execution = None if adapter is None else self.choose_execution(adapter, x)
        if self.last_execution == "merged":
            if not (torch.is_grad_enabled() and self.projects_gradients(adapter)):
                return self.operation_with_weight(
                    x, lambda: self.merge_weight(adapter, self.weight).to(self.operation_dtype(x))
                )
            core, factors = self._params(adapter, self.compute_dtype(adapter))

            @torch.no_grad()
            def merged_weight():
                return ops.tucker_merge(self.weight, core, factors, adapter.scale).to(x.dtype)

            y = self.operation_with_weight(x, merged_weight)
            return _ProjectedTuckerGradients.apply(y, x, self, adapter.scale, core, *factors)
        if self.last_execution == "factorized":
            delta = self.delta_forward(adapter, self.adapter_input(adapter, x))
            result = self.base_layer(x)
            return result + delta.to(result.dtype)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", last_execution={self.last_execution}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unchanged(tensor: Tensor) -> Tensor:
    return tensor


def time_executions(layer: FLoRALayer, adapter: Adapter, x: Tensor) -> dict[str, float]:
    """Median seconds of one step of ``layer`` on a copy of ``x`` by each path: forward,
    and backward to the trainable parameters and the input when grad mode is on. One
    warm-up step per path, then ``AUTOTUNE_REPEATS`` steps with the paths interleaved.

    The caller sees no trace of the trial: gradients come from ``torch.autograd.grad``
    (no ``.grad`` is written), the RNG state is forked, and the caller's saved-tensor
    hooks (gradient checkpointing) do not see the trial's graph."""
    trial_input = x.detach().clone().requires_grad_(x.requires_grad)
    wanted = [p for p in layer.parameters() if p.requires_grad] + ([trial_input] if x.requires_grad else [])
    backward = torch.is_grad_enabled() and bool(wanted)
    execution, last_execution = adapter.execution, layer.last_execution

    def step(path: str) -> float:
        _synchronize(x.device)
        start = time.perf_counter()
        adapter.execution = path
        out = layer.forward(trial_input)
        if backward:  # outside autocast, as a training step's backward runs
            with torch.autocast(x.device.type, enabled=False):
                torch.autograd.grad(out, wanted, torch.ones_like(out), allow_unused=True)
        _synchronize(x.device)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {path: [] for path in PATHS}
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices), torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged):
            for path in PATHS:
                step(path)
            for _ in range(AUTOTUNE_REPEATS):
                for path in PATHS:
                    times[path].append(step(path))
    finally:
        adapter.execution, layer.last_execution = execution, last_execution
    return {path: statistics.median(seconds) for path, seconds in times.items()}
