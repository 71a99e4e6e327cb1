"""Triton kernels of the competition sparsification: the threshold τ, the exact k-th
smallest magnitude, and the mask that keeps the entries above it.

- τ by radix select on the float bits, 11-bit digits in every pass (the CPU and CUDA
  kernels share ``csrc/include/tensor_peft/radix_select.h``, with digits of their own):
  per pass, the digit of the keys that share the digits found so far is histogrammed
  (``count_kernel``, or the producer's first pass, ``kernelized.delta_kernel``) and a
  one-program ``search_kernel`` picks the bin holding the k-th on the device, so no pass
  waits on the host; counts are int64 (integer atomics, exact), any number of entries.
  Once the digits found narrow the keys to an eighth of an octave (float32: after the
  first digit; float64: after two), ``refine_kernel`` copies the values whose keys still
  match into a candidates buffer of ``_candidate_capacity`` entries while it counts, and
  counts the later digits over those candidates only; when they did not fit, the next
  pass reads all of the input again and copies out the fewer that match its longer
  prefix (decided on the device).
- ``mask_kernel``: the sparsification ΔW·|ΔW|·1[|ΔW| > τ] (hard) or ΔW·(|ΔW| − τ⁺)·1[…]
  (soft) and, for the backward, its derivative with τ (and, hard, |ΔW|) held constant,
  in τ's dtype (the compute dtype), rounded once into the output's dtype.
Registers the ``sparsify`` op and its backward."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..native import mode_id
from ..registry import register
from .shared import launch, rounded

BLOCK = 1024  # entries per program of the elementwise passes
DIGIT = 11  # bits per radix pass
BINS = 1 << DIGIT
REFINE_PROGRAMS = 2048  # refine_kernel's grid at most: about as many programs as a GPU holds at once
# Globals that kernels read must be constexpr.
HARD = tl.constexpr(mode_id("hard"))


@triton.jit
def _mask_factor(value, tau, MODE: tl.constexpr, BACKWARD: tl.constexpr):
    """out = value·factor, or ∂out/∂value (τ, and hard |value|, held constant)."""
    magnitude = tl.abs(value)
    tau_plus = tl.where(tau < 0.0, 0.0, tau)  # max(τ, 0), a NaN τ passed on
    if MODE == HARD:
        factor = magnitude
    elif BACKWARD:
        factor = 2.0 * magnitude - tau_plus
    else:
        factor = magnitude - tau_plus
    return tl.where(magnitude > tau, factor, factor * 0.0)  # dropped: 0, or NaN for a non-finite entry


@triton.jit
def _keys(values, DOUBLE: tl.constexpr):
    """The radix keys of |values|: their bits without the sign, as int64 (a half value's
    bits as float32, exactly)."""
    if DOUBLE:
        keys = values.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        keys = (values.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
    return keys


@triton.jit
def _count_digits(values, inside, counts, prefix, prefix_mask, shift, DOUBLE: tl.constexpr, BINS: tl.constexpr):
    """Adds into counts[BINS] the digit (key >> shift) of the keys |value| that match
    prefix on prefix_mask, with atomics only for the bins this block fills; returns
    which entries matched."""
    keys = _keys(values, DOUBLE)
    match = inside & ((keys & prefix_mask) == prefix)
    digits = ((keys >> shift) & (BINS - 1)).to(tl.int32)
    histogram = tl.histogram(digits, BINS, mask=match)
    tl.atomic_add(counts + tl.arange(0, BINS), histogram.to(tl.int64), mask=histogram > 0, sem="relaxed")
    return match


@triton.jit
def count_kernel(x, count, counts, state, shift, DOUBLE: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < count
    values = tl.load(x + offsets, mask=inside, other=0.0)
    _count_digits(values, inside, counts, tl.load(state), tl.load(state + 1), shift, DOUBLE, BINS)


@triton.jit
def refine_kernel(x, count, candidates, lengths, capacity, counts, state, shift,
                  COMPACT: tl.constexpr, DOUBLE: tl.constexpr, BINS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """A radix pass from the compaction on, each program looping over blocks: over the
    lengths[0] candidates when they fit the buffer (lengths[1] = lengths[0]), else over
    all of x, COMPACT: copying the values whose keys match into candidates[capacity], in
    any order (the counts do not depend on it), lengths[1] counting them all."""
    prefix, prefix_mask, length = tl.load(state), tl.load(state + 1), tl.load(lengths)
    fits = length <= capacity
    source, end = tl.where(fits, candidates, x), tl.where(fits, length, count)
    if tl.program_id(0) == 0:
        tl.store(lengths + 1, length, mask=fits)
    first, stride = tl.program_id(0).to(tl.int64) * BLOCK, tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(first, end, stride):
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < end
        values = tl.load(source + offsets, mask=inside, other=0.0)
        match = _count_digits(values, inside, counts, prefix, prefix_mask, shift, DOUBLE, BINS)
        if COMPACT:
            total = tl.sum(match.to(tl.int64), 0)
            if (total > 0) & (length > capacity):
                slots = tl.atomic_add(lengths + 1, total, sem="relaxed") + tl.cumsum(match.to(tl.int64), 0) - 1
                tl.store(candidates + slots, values, mask=match & (slots < capacity))


@triton.jit
def search_kernel(counts, state, shift, BINS: tl.constexpr):
    """state = (prefix, prefix_mask, rank): the bin of this pass's counts that holds the
    rank-th smallest key joins the prefix; rank becomes the rank inside that bin."""
    bins = tl.arange(0, BINS)
    c = tl.load(counts + bins)
    rank = tl.load(state + 2)
    below = tl.cumsum(c, 0)  # keys in bins ≤ b
    chosen = tl.minimum(tl.sum((below < rank).to(tl.int64), 0), BINS - 1)
    before = tl.sum(tl.where(bins < chosen, c, 0), 0)
    tl.store(state, tl.load(state) | (chosen << shift))
    tl.store(state + 1, tl.load(state + 1) | (tl.full((), BINS - 1, tl.int64) << shift))
    tl.store(state + 2, rank - before)


@triton.jit
def mask_kernel(out, x, grad, count, tau, MODE: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
    """out = x·factor (forward) or grad·∂(x·factor)/∂x (backward), factor by ``_mask_factor``,
    in τ's dtype (the compute dtype), rounded once into out's."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < count
    threshold = tl.load(tau)
    values = tl.load(x + offsets, mask=inside, other=0.0).to(threshold.dtype)
    factor = _mask_factor(values, threshold, MODE, BACKWARD)
    if BACKWARD:
        result = tl.load(grad + offsets, mask=inside, other=0.0).to(threshold.dtype) * factor
    else:
        result = values * factor
    tl.store(out + offsets, rounded(result, out.dtype.element_ty), mask=inside)


def _shifts(dtype: torch.dtype) -> list[int]:
    """The radix passes' shifts, most significant digit first, over the 31 (63) bits of a
    float32 (float64) magnitude; the last digit may overlap found bits, which is harmless."""
    key_bits = 63 if dtype == torch.float64 else 31
    return [max(shift, 0) for shift in range(key_bits - DIGIT, -DIGIT, -DIGIT)]


def _compacting_pass(dtype: torch.dtype) -> int:
    """The index of the first pass that copies out candidates: the first whose prefix
    holds the exponent and 3 bits of mantissa (a bin of an eighth of an octave)."""
    exponent_bits = 11 if dtype == torch.float64 else 8
    return -(-(exponent_bits + 3) // DIGIT)


def _candidate_capacity(numel: int) -> int:
    """Entries of the candidates buffer: an eighth of the input (a bin of an eighth of an
    octave holds less for most data; more falls back to a pass over the whole input)."""
    return max(numel // 8, 1)


def _new_counts(x: torch.Tensor) -> torch.Tensor:
    """Zeroed int64 counts, one row of BINS per radix pass of x's dtype."""
    return torch.zeros(len(_shifts(x.dtype)), BINS, dtype=torch.int64, device=x.device)


def _kth_smallest_magnitude(x: torch.Tensor, k: int, counted: torch.Tensor | None = None) -> torch.Tensor:
    """τ (a 0-dim tensor, never read on the host) = the k-th smallest |x| (1-based); −inf
    when k = 0. ``counted``: counts from ``_new_counts`` whose first pass a producer
    kernel has already filled. The passes before ``_compacting_pass`` read all of x; from
    it on, a pass reads the candidates the pass before copied out when they fit the
    buffer, else all of x again, copying out the (fewer) keys that match the longer prefix."""
    shifts, numel, double = _shifts(x.dtype), x.numel(), x.dtype == torch.float64
    dtype = torch.float64 if double else torch.float32  # τ's: a half x's keys are its float32 bits
    if k == 0:
        return x.new_full((), float("-inf"), dtype=dtype)
    counts = _new_counts(x) if counted is None else counted
    state = torch.zeros(3, dtype=torch.int64, device=x.device)  # prefix, its mask, rank
    state[2] = k  # a fill on the device: no copy from the host, no synchronization
    capacity, compacting = _candidate_capacity(numel), _compacting_pass(x.dtype)
    candidates = x.new_empty(capacity)
    lengths = torch.zeros(len(shifts) + 1, dtype=torch.int64, device=x.device)  # candidates before each pass
    lengths[compacting] = capacity + 1  # none yet: the compacting pass reads all of x
    for index, shift in enumerate(shifts):
        if index >= compacting:
            launch(refine_kernel, (min(triton.cdiv(numel, BLOCK), REFINE_PROGRAMS),),
                x, numel, candidates, lengths[index:], capacity, counts[index], state, shift,
                COMPACT=index < len(shifts) - 1, DOUBLE=double, BINS=BINS, BLOCK=BLOCK,
            )  # fmt: skip
        elif index > 0 or counted is None:
            launch(count_kernel, (triton.cdiv(numel, BLOCK),),
                x, numel, counts[index], state, shift, DOUBLE=double, BINS=BINS, BLOCK=BLOCK,
            )  # fmt: skip
        launch(search_kernel, (1,), counts[index], state, shift, BINS=BINS)
    bits = state[:1] if double else state[:1].to(torch.int32)
    return bits.view(dtype).reshape(())


def _mask(out, x, grad, tau, mode, backward):
    if x.numel():
        launch(mask_kernel, (triton.cdiv(x.numel(), BLOCK),),
            out, x, grad, x.numel(), tau, MODE=mode_id(mode), BACKWARD=backward, BLOCK=BLOCK,
        )  # fmt: skip
    return out



@register("sparsify", "triton")
def sparsify(delta, k, mode):
    tau = _kth_smallest_magnitude(delta, k)
    return [_mask(torch.empty_like(delta), delta, delta, tau, mode, backward=False), tau]


@register("sparsify_backward", "triton")
def sparsify_backward(grad, delta, tau, mode):
    return _mask(torch.empty_like(delta), delta, grad, tau, mode, backward=True)
