"""``sparsify``: SNELL's competition sparsification of a dense update.

With sparsity s, k entries are dropped: τ is the k-th smallest |ΔW| (τ = −inf, keep
all, when k = 0) and entries with |ΔW| > τ are kept (ties at τ are dropped, so every
backend keeps the same set). τ is a stop-gradient, as in the released code where the
threshold comes from detached magnitudes. The ``threshold`` rule gives k:

- ``count`` (default): k = ceil(s·numel), s read as its decimal.
- ``quantile`` (the released code's ``|ΔW| > torch.quantile(|ΔW|, s)``, linear
  interpolation): τ = lerp(v_k, v_{k+1}, w) of the k-th and (k+1)-th smallest |ΔW| with
  rank s·(numel − 1) = (k − 1) + w, all rounded in ΔW's compute dtype (float32 for a
  half ΔW) as torch.quantile rounds them, so the same entries are kept (the
  interpolation may round up to v_{k+1}, dropping it too: a rank just below an
  integer); without torch.quantile's limit of 2^24 entries.
  It always drops at least the smallest entry. A fractional rank costs a second selection.

``sparsity`` may be a 0-dim float tensor (layers keep it so, on the CPU: a new value
then never recompiles a torch.compile'd model); the ops read it on the host.

- ``hard`` (released code): ΔW ⊙ sg(|ΔW|) ⊙ 1[|ΔW| > τ]; ∂ = Γ ⊙ |ΔW| ⊙ mask.
- ``soft`` (paper eq. 5): ΔW ⊙ max(|ΔW| − τ⁺, 0), τ⁺ = max(τ, 0) (equal to the paper
  for k ≥ 1; keeps all as ΔW ⊙ |ΔW| for k = 0); ∂ = Γ ⊙ (2|ΔW| − τ⁺) ⊙ mask.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from fractions import Fraction

import torch
from torch import Tensor

from ..backends.tensor_algebra import compute_dtype, masked
from ..backends.registry import run
from ..config import MODES, THRESHOLDS, check_choice, check_sparsity
from ._common import check_tensor, custom_op, prepare, register_backward


def dropped_count(sparsity: float, numel: int, threshold: str = "count", dtype: torch.dtype = torch.float32) -> int:
    """k, the number of entries dropped (see the module doc). ``count``: ceil(sparsity ·
    numel), with sparsity read as the decimal it was written as (0.9 of 10 entries drops
    9, not ceil(9.000000000000002) = 10). ``quantile``: floor(sparsity · (numel − 1)) + 1
    computed as torch.quantile computes the rank for a tensor of ``dtype`` (the selection
    may drop one more entry: see ``select``)."""
    sparsity = float(sparsity)
    if threshold == "count":
        return _count_dropped(sparsity, numel)
    if numel == 0:
        return 0
    return min(math.floor(quantile_rank(sparsity, numel, dtype)) + 1, numel)


@functools.lru_cache(maxsize=4096)
def _count_dropped(sparsity: float, numel: int) -> int:
    """ceil(sparsity · numel) with sparsity as written, exact (a Fraction: kept per
    argument, as every forward asks again for the same layer's count)."""
    return math.ceil(Fraction(repr(sparsity)) * numel)


def quantile_rank(sparsity: float, numel: int, dtype: torch.dtype) -> Tensor:
    """torch.quantile's rank of ``sparsity`` among ``numel`` values of ``dtype``: s·(numel − 1) in ``dtype``."""
    return torch.tensor(float(sparsity), dtype=dtype) * (numel - 1)


def select(compute: Callable[[int, Tensor | None], list[Tensor]], sparsity: Tensor, numel: int, threshold: str,
           dtype: torch.dtype) -> list[Tensor]:  # fmt: skip
    """[out, τ] by the ``threshold`` rule, from a backend's ``compute(k, τ)`` (drop the k
    smallest, or mask by the τ given). ``quantile`` with a fractional rank selects k + 1
    too and interpolates τ between the two as torch.quantile does."""
    dropped = dropped_count(sparsity, numel, threshold, dtype)
    out, tau = compute(dropped, None)
    if threshold == "count" or dropped == numel:
        return [out, tau]
    rank = quantile_rank(sparsity, numel, dtype)
    weight = rank - rank.floor()
    if not weight > 0:
        return [out, tau]
    upper = compute(dropped + 1, None)
    interpolated = tau.lerp(upper[1], weight.to(tau.device))
    if bool(interpolated == tau):
        return [out, tau]
    if bool(interpolated == upper[1]):
        return upper
    return compute(dropped, interpolated)


def sparsity_tensor(sparsity: object) -> Tensor:
    """``sparsity`` (a number, or a 0-dim floating tensor on the CPU) checked, as a float64
    0-dim CPU tensor: the form the ops take. A tensor is passed through (not copied) and
    its value is checked except under torch.compile."""
    if not isinstance(sparsity, Tensor):
        return torch.tensor(check_sparsity(sparsity), dtype=torch.float64)
    if sparsity.ndim != 0 or not sparsity.is_floating_point() or sparsity.device.type != "cpu":
        raise ValueError(
            f"sparsity as a tensor must be a 0-dim floating tensor on the cpu, got shape "
            f"{tuple(sparsity.shape)}, {sparsity.dtype} on {sparsity.device}"
        )
    if not torch.compiler.is_compiling():
        check_sparsity(float(sparsity))
    return sparsity.detach().to(torch.float64)


def _fake_sparsify(delta, sparsity, mode, threshold):
    return torch.empty_like(delta), delta.new_empty((), dtype=compute_dtype(delta))


@custom_op("sparsify", fake=_fake_sparsify)
def _sparsify(delta: Tensor, sparsity: Tensor, mode: str, threshold: str) -> tuple[Tensor, Tensor]:
    """[ΔW sparsified, τ], τ in the compute dtype (a half ΔW's threshold is selected and
    interpolated in float32, as for the float32 ΔW)."""
    if delta.numel() == 0:  # nothing to drop: k = 0
        return torch.empty_like(delta), delta.new_full((), -math.inf, dtype=compute_dtype(delta))

    def compute(dropped: int, tau: Tensor | None) -> list[Tensor]:
        if tau is None:
            return run("sparsify", delta.device, delta, dropped, mode)
        return [masked(delta.to(tau.dtype), tau, mode).to(delta.dtype), tau]

    out, tau = select(compute, sparsity, delta.numel(), threshold, compute_dtype(delta))
    return out, tau


@custom_op("sparsify_backward", fake=lambda grad, delta, tau, mode: torch.empty_like(delta))
def _sparsify_backward(grad: Tensor, delta: Tensor, tau: Tensor, mode: str) -> Tensor:
    if delta.numel() == 0:
        return torch.empty_like(delta)
    return run("sparsify_backward", delta.device, grad, delta, tau, mode)


def _setup_context(ctx, inputs, output):
    delta, sparsity, mode, threshold = inputs
    _, tau = output
    ctx.mark_non_differentiable(tau)
    ctx.save_for_backward(delta, tau)
    ctx.mode = mode


def _backward(ctx, grad, grad_tau):
    delta, tau = ctx.saved_tensors
    return _sparsify_backward(grad.contiguous(), delta, tau, ctx.mode), None, None, None


register_backward(_sparsify, "sparsify", _setup_context, _backward)


def sparsify(delta: Tensor, sparsity: float | Tensor, mode: str = "hard", threshold: str = "count") -> Tensor:
    """Keep the entries of ``delta`` that win the magnitude competition (see module doc).

    ``sparsity`` is the fraction of entries zeroed, in [0, 1]; ``threshold`` the rule
    that turns it into a count (count, quantile); returns delta's dtype."""
    delta = check_tensor(delta, "delta")
    sparsity = sparsity_tensor(sparsity)
    mode = check_choice(mode, "mode", MODES)
    threshold = check_choice(threshold, "threshold", THRESHOLDS)
    (computed,) = prepare("sparsify", delta)
    out, _ = _sparsify(computed, sparsity, mode, threshold)
    return out.to(delta.dtype)
