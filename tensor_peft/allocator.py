"""SNELLA's bi-level sparsity allocation (docs/methods/snell.md): across layers, a non-zero budget that
shrinks on a cubic schedule and is split by layer importance; inside a layer, SNELL's
competition keeps that many entries.

Use, after ``inject(model, SNELLAConfig(...))``::

    allocator = SparsityAllocator(model)
    for batch in data:
        loss(model, batch).backward()
        optimizer.step()
        allocator.step()          # reads the gradients: before zero_grad
        optimizer.zero_grad()

The importance statistics and the step count live in ``allocator.state_dict()``; the
layers' current sparsities are the adapters' own state, in ``model.state_dict()``. Saving
both and loading them into a fresh model and allocator resumes training exactly."""

from __future__ import annotations

import math
import struct
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .config import SNELLAConfig
from .model import adapter_layers
from .ops.sparsify import dropped_count


def _float_bits(value: float) -> int:
    """The bit pattern of a non-negative float64: it orders as the floats do."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def sparsity_keeping(kept: int, size: int, dropped: Callable[[float], int] | None = None) -> float:
    """The sparsity s for which a layer of ``size`` entries keeps exactly ``kept``, with
    ``dropped(s)`` the entries it drops (default: the ``count`` rule): of the floats that
    do, the one nearest (size − kept)/size, so that s also reads as ``kept`` kept (the
    fraction itself when it does; else the float next to it, found by bisection: the
    count never falls as s grows). A ValueError if no sparsity keeps ``kept``."""
    dropped = dropped or (lambda sparsity: dropped_count(sparsity, size))
    target = size - kept
    fraction = target / size if size else 0.0
    if dropped(fraction) < target:  # the nearest is the first float dropping target
        sparsity = _bits_float(_first_float_bits(lambda s: dropped(s) >= target))
    elif dropped(fraction) > target:  # the nearest is the last float dropping target
        sparsity = _bits_float(max(_first_float_bits(lambda s: dropped(s) > target) - 1, 0))
    else:
        sparsity = fraction
    if dropped(sparsity) != target:
        raise ValueError(f"no sparsity keeps exactly {kept} of {size} entries")
    return sparsity


def _first_float_bits(holds: Callable[[float], bool]) -> int:
    """The bits of the first float of [0, 1] for which ``holds`` (false, then true as the
    float grows), or those of 1.0 if it holds for none before."""
    low, high = _float_bits(0.0), _float_bits(1.0)
    while low < high:
        middle = (low + high) // 2
        if holds(_bits_float(middle)):
            high = middle
        else:
            low = middle + 1
    return low


def distribute(budget: int, scores: list[float], capacities: list[int], floors: list[int] | None = None) -> list[int]:
    """Split ``budget`` units by ``scores`` (summing to 1), each part at least its floor
    (default 0) and at most its capacity: the floors first, then floor(rest·score) capped
    at the room left, then what is left goes again by score to the parts with room, and
    the last units (less than one per part) one each to the parts with room, highest
    score first."""
    floors = floors or [0] * len(scores)
    rest = budget - sum(floors)
    kept = [floor + min(capacity - floor, math.floor(rest * score))
            for score, capacity, floor in zip(scores, capacities, floors)]  # fmt: skip
    while True:
        left = budget - sum(kept)
        room = [i for i, capacity in enumerate(capacities) if kept[i] < capacity]
        if left <= 0 or not room:
            return kept
        weights = {i: scores[i] for i in room}
        total = sum(weights.values())
        if total <= 0:
            weights, total = {i: 1.0 for i in room}, float(len(room))
        shares = {i: min(capacities[i] - kept[i], math.floor(left * weights[i] / total)) for i in room}
        if not any(shares.values()):
            for i in sorted(room, key=lambda i: -weights[i])[:left]:
                kept[i] += 1
            return kept
        for i, share in shares.items():
            kept[i] += share


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` (magnitudes, ≥ 0 or NaN) is finite: one read of
    the largest of each (NaN and inf propagate through max)."""
    maxima = torch._foreach_max([tensor for tensor in tensors if tensor.numel()])
    return not maxima or bool(torch.stack(maxima).isfinite().all())


def _non_finite_cause(keys: list[tuple[str, str]], embeddings: list[torch.Tensor], grads: list[torch.Tensor]) -> str:
    """Why an importance |θ·g| is not finite, naming the first module it is not in: its
    gradients, its embeddings, or (both finite) the product overflowing float32."""
    for what, tensors in (("gradients", grads), ("embeddings", embeddings)):
        bad = next((name for (name, _), tensor in zip(keys, tensors) if not tensor.isfinite().all()), None)
        if bad is not None:
            return f"module {bad!r} has non-finite {what}"
    bad = next(name for (name, _), embedding, grad in zip(keys, embeddings, grads)
               if not (embedding * grad).float().isfinite().all())  # fmt: skip
    return f"module {bad!r}: |embedding · gradient| overflows float32 (the gradients and embeddings are finite)"


def check_floors(floors: list[int], budget: int, min_keep: float) -> None:
    """ValueError if the layers' floors add up to more than the smallest budget of the schedule."""
    if sum(floors) > budget:
        raise ValueError(
            f"min_keep={min_keep} keeps {sum(floors)} entries in all, more than the budget of {budget} the "
            "sparsity schedule comes down to: lower min_keep or target_sparsity"
        )


def statistics_key(module_name: str) -> str:
    """The key of a layer's statistics (module names hold dots, ModuleDict keys cannot):
    an escape that keeps distinct names distinct."""
    return module_name.replace("%", "%25").replace(".", "%2E")


class _LayerStatistics(nn.Module):
    """Ī (importance EMA) and Ū (its uncertainty EMA) for a layer's In and Out embeddings."""

    def __init__(self, adapter: nn.Module):
        super().__init__()
        for side in ("in", "out"):
            embedding = getattr(adapter, f"snell_{side}")
            self.register_buffer(f"importance_{side}", torch.zeros_like(embedding, dtype=torch.float32))
            self.register_buffer(f"uncertainty_{side}", torch.zeros_like(embedding, dtype=torch.float32))


class SparsityAllocator(nn.Module):
    """Sets the sparsity of each layer of SNELLA adapter ``adapter_name`` during training
    (see the module docstring for the loop)."""

    def __init__(self, model: nn.Module, adapter_name: str = "default"):
        super().__init__()
        config = getattr(model, "tensor_peft_configs", {}).get(adapter_name)
        if not isinstance(config, SNELLAConfig):
            raise ValueError(
                f"the model has no SNELLA adapter named {adapter_name!r} (inject a SNELLAConfig first)"
            )
        self.config, self.adapter_name = config, adapter_name
        # plain dicts: the model's modules are not the allocator's state
        self.layers = {name: layer for name, layer in adapter_layers(model).items() if adapter_name in layer.adapters}
        self.adapters = {name: layer.adapters[adapter_name] for name, layer in self.layers.items()}
        self.statistics_keys = {name: statistics_key(name) for name in self.adapters}
        self.statistics = nn.ModuleDict(
            {self.statistics_keys[name]: _LayerStatistics(adapter) for name, adapter in self.adapters.items()}
        )
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.sizes = [adapter.snell_out.shape[1] * adapter.snell_in.shape[1] for adapter in self.adapters.values()]
        check_floors(self.floors(), min(self.budget(0), self.budget(config.total_steps)), config.min_keep)
        self._pack()

    def _slots(self) -> list[tuple[str, str]]:
        """(module name, side) of every embedding, in the order step() reads them."""
        return [(name, side) for name in self.adapters for side in ("in", "out")]

    def _pack(self) -> None:
        """Make the statistics buffers views of one flat tensor per kind (in ``_slots``
        order) when they are plain tensors of one device and dtype: step() then updates
        them in a few whole-tensor ops, where a multi-tensor op is a loop of per-tensor
        ops on the CPU. Otherwise (DTensors, several devices) nothing is packed."""
        self.packed = None
        stats = [(self.statistics[self.statistics_keys[name]], side) for name, side in self._slots()]
        kinds = {kind: [getattr(layer, f"{kind}_{side}") for layer, side in stats]
                 for kind in ("importance", "uncertainty")}  # fmt: skip
        tensors = [tensor for group in kinds.values() for tensor in group]
        if not tensors or any(type(t) is not torch.Tensor for t in tensors):
            return
        if len({(tensor.device, tensor.dtype) for tensor in tensors}) > 1:
            return
        packed = {}
        for kind, group in kinds.items():
            flat, offset = torch.cat([tensor.reshape(-1) for tensor in group]), 0
            for (layer, side), tensor in zip(stats, group):
                setattr(layer, f"{kind}_{side}", flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()
            packed[kind] = flat
        self.packed = packed

    def _apply(self, fn, recurse=True):
        """As ``nn.Module._apply`` (``to``, ``cuda``, casts), the buffers packed again."""
        super()._apply(fn, recurse)
        self._pack()
        return self

    def budget(self, step: int) -> int:
        """V(t) = V_T + (V_0 − V_T)·(1 − (t − t_i)/(T − t_i − t_f))³, the fraction clamped
        to [0, 1] (V_0 before warmup ends, V_T in the final steps), rounded down."""
        c = self.config
        start = sum((1 - c.init_sparsity) * n for n in self.sizes)
        end = sum((1 - c.target_sparsity) * n for n in self.sizes)
        progress = (step - c.warmup_steps) / (c.total_steps - c.warmup_steps - c.final_steps)
        progress = min(max(progress, 0.0), 1.0)
        return math.floor(end + (start - end) * (1 - progress) ** 3)

    def scores(self) -> list[float]:
        """S_l = mean(Ī⊙Ū | In_l) + mean(Ī⊙Ū | Out_l), normalised to sum 1 (equal when all are 0)."""
        raw = [
            sum(float((getattr(stats, f"importance_{side}") * getattr(stats, f"uncertainty_{side}")).mean())
                for side in ("in", "out"))
            for stats in self.statistics.values()
        ]  # fmt: skip
        total = sum(raw)
        if not total > 0:
            return [1 / len(raw)] * len(raw)
        return [score / total for score in raw]

    @torch.no_grad()
    def step(self) -> None:
        """Update the importance statistics from the current gradients (call after
        ``optimizer.step()``, before ``zero_grad``); every ``interval`` steps from the end
        of warmup on, reallocate the layers' sparsities.

        A step whose gradients are not all finite (an overflowing float16 step, which
        GradScaler skips too) leaves the statistics as they were, with a warning; the step
        still counts for the schedule. Refuses while the adapter is merged into a layer
        (a new sparsity would change the ΔW that unmerge takes out)."""
        c = self.config
        merged = [name for name, layer in self.layers.items() if self.adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(
                f"adapter {self.adapter_name!r} is merged into module {merged[0]!r}: unmerge before allocator.step()"
            )
        keys, embeddings, grads = self._slots(), [], []
        for name, side in keys:
            embedding = getattr(self.adapters[name], f"snell_{side}")
            if embedding.grad is None:
                raise RuntimeError(
                    f"{name}: snell_{side} has no gradient; call allocator.step() after "
                    "loss.backward() and optimizer.step(), before optimizer.zero_grad()"
                )
            dtype = torch.promote_types(embedding.dtype, torch.float32)  # |θ·g| of half embeddings in float32
            embeddings.append(embedding.to(dtype))
            grads.append(embedding.grad.to(dtype))
        # one multi-tensor op per stage for all layers, or one op on the packed buffers, in
        # place where it can be (a step's cost is the calls, not the flops)
        products = torch._foreach_mul(embeddings, grads)
        if self.packed is None:
            torch._foreach_abs_(products)
            importances = products
            statistics = [self.statistics[self.statistics_keys[name]] for name, _ in keys]
            means = [getattr(stats, f"importance_{side}") for stats, (_, side) in zip(statistics, keys)]
            uncertainties = [getattr(stats, f"uncertainty_{side}") for stats, (_, side) in zip(statistics, keys)]
        else:
            importances = [torch.cat([product.reshape(-1) for product in products]).abs_()]
            means, uncertainties = [self.packed["importance"]], [self.packed["uncertainty"]]
        if any(importance.dtype != torch.float32 for importance in importances):
            importances = [importance.float() for importance in importances]
        if not _all_finite(importances):
            warnings.warn(f"{_non_finite_cause(keys, embeddings, grads)}: this step leaves the importance statistics as they were")
        else:
            torch._foreach_lerp_(means, importances, 1 - c.beta1)  # β1·Ī + (1 − β1)·I
            deviations = torch._foreach_sub(importances, means)
            torch._foreach_abs_(deviations)
            torch._foreach_lerp_(uncertainties, deviations, 1 - c.beta2)
        self.steps += 1
        step = int(self.steps)
        if step >= c.warmup_steps and step % c.interval == 0:
            self.allocate(step)

    def capacities(self) -> list[int]:
        """The most entries each layer can keep (all, or all but one under the quantile rule)."""
        return [n - adapter.dropped_count(0.0) for n, adapter in zip(self.sizes, self.adapters.values())]

    def floors(self) -> list[int]:
        """The fewest entries each layer keeps: ceil(min_keep·entries), at least 1, at most its capacity."""
        return [min(capacity, max(1, math.ceil(self.config.min_keep * n)))
                for n, capacity in zip(self.sizes, self.capacities())]  # fmt: skip

    def allocate(self, step: int) -> list[float]:
        """Give each layer its floor and a share of the rest of ``budget(step)`` by score;
        returns the sparsities."""
        kept = distribute(self.budget(step), self.scores(), self.capacities(), self.floors())
        sparsities = [sparsity_keeping(k, n, adapter.dropped_count)
                      for k, n, adapter in zip(kept, self.sizes, self.adapters.values())]  # fmt: skip
        for adapter, sparsity in zip(self.adapters.values(), sparsities):
            adapter.sparsity = sparsity
        return sparsities

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; a state of other layers raises a ValueError
        naming them."""
        own = {key: value.shape for key, value in self.state_dict().items()}
        missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
        if strict and (missing or unexpected):
            raise ValueError(f"allocator state does not fit this model's layers: missing {missing}, unexpected {unexpected}")
        for key in own.keys() & state_dict.keys():
            if tuple(state_dict[key].shape) != tuple(own[key]):
                raise ValueError(f"allocator state {key!r} has shape {tuple(state_dict[key].shape)}, this model's {tuple(own[key])}")
        result = super().load_state_dict(state_dict, strict, assign)
        self._pack()  # assign=True put the loaded tensors in place of the views
        return result

    def sparsities(self) -> dict[str, float]:
        """The layers' current sparsities by module name."""
        return {name: adapter.sparsity for name, adapter in self.adapters.items()}

    def extra_repr(self) -> str:
        return f"layers={len(self.adapters)}, steps={int(self.steps)}"
