"""The op calls whose Triton launches the static check compiles: typical shapes of each
method, in float32 and float64, on ``meta`` tensors (no data: only the launchers' choices
of grid, block sizes and constexprs matter).

- Tucker / LieRA hadamard (``lowrank.py``): a 4096×4096 linear and a 512×512×3×3 conv at
  r = 8 and 64 (``tucker_merge`` also with a bfloat16 weight);
- ``matrix_exp`` with and without the derivative: n = 3, 8, 16, 32, 64, 128;
- SNELL (``kernelized.py``): 768×3072 and 4096×11008 at r = 8 in two chunks, every kernel
  function, dense, sparsified (hard, soft) and sparsify alone, forward and backward; the
  sparsified calls launch every kernel of the threshold search (``count_kernel``,
  ``refine_kernel`` with and without the compaction, ``search_kernel``: which source a
  refine pass reads is decided on the device, so one compile covers both)."""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch

from ..config import EXP_FORMS, KERNELS, MODES

DTYPES = (torch.float32, torch.float64)
META = torch.device("meta")


def _empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def _lowrank(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], object]]]:
    from ..backends import registry

    kernel = partial(registry.kernel, name="triton")

    for layer, weight_shape in (("linear 4096x4096", (4096, 4096)), ("conv 512x512x3x3", (512, 512, 3, 3))):
        for r in (8, 64):
            core = _empty(r, r, *weight_shape[2:], dtype=dtype)
            factors = [_empty(d, r, dtype=dtype) for d in weight_shape[:2]]
            factors += [_empty(d, d, dtype=dtype) for d in weight_shape[2:]]
            weight = _empty(*weight_shape, dtype=dtype)
            B, A = _empty(weight_shape[0], r, dtype=dtype), _empty(r, *weight_shape[1:], dtype=dtype)
            name = f"{layer} r={r}"
            yield f"tucker_delta {name}", partial(kernel("tucker_delta"), core, factors, 0.5)
            yield f"tucker_merge {name}", partial(kernel("tucker_merge"), weight, core, factors, 0.5)
            if dtype == torch.float32:  # a bfloat16 model's weight, read and written in its dtype
                half_weight = _empty(*weight_shape, dtype=torch.bfloat16)
                yield f"tucker_merge bf16 weight {name}", partial(kernel("tucker_merge"), half_weight, core, factors, 0.5)
            yield f"tucker_delta_backward {name}", partial(kernel("tucker_delta_backward"), weight, core, factors, 0.5)
            for exp in EXP_FORMS:
                yield f"lowrank_hadamard_merge {exp} {name}", partial(
                    kernel("lowrank_hadamard_merge"), weight, B, A, 0.5, exp
                )
                yield f"lowrank_hadamard_merge_backward {exp} {name}", partial(
                    kernel("lowrank_hadamard_merge_backward"), weight, weight, B, A, 0.5, exp
                )


def _expm(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], object]]]:
    from ..backends.triton import expm

    for n in (3, 8, 16, 32, 64, 128):
        A = _empty(64, n, n, dtype=dtype)
        yield f"matrix_exp n={n}", partial(expm.matrix_exp, A)
        yield f"matrix_exp_backward n={n}", partial(expm.matrix_exp_backward, A, A)


def _kernelized(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], object]]]:
    from ..backends.triton import kernelized

    chunks, width = 2, 4
    coeff, params = _empty(chunks, dtype=dtype), _empty(3, dtype=dtype)
    for m, n in ((768, 3072), (4096, 11008)):
        out_emb, in_emb = _empty(chunks, m, width, dtype=dtype), _empty(chunks, n, width, dtype=dtype)
        delta, tau = _empty(m, n, dtype=dtype), _empty(dtype=dtype)
        k = m * n // 2
        shape = f"{m}x{n}"
        for kernel in KERNELS:
            args = (kernel, coeff, params, 1e-6)
            yield f"kernelized_delta {kernel} {shape}", partial(
                kernelized.kernelized_sparse_delta, out_emb, in_emb, 0, *args, None
            )
            yield f"kernelized_delta_backward {kernel} {shape}", partial(
                kernelized.kernelized_sparse_delta_backward, delta, out_emb, in_emb, None, *args, None
            )
            for mode in MODES:
                yield f"kernelized_sparse_delta {kernel} {mode} {shape}", partial(
                    kernelized.kernelized_sparse_delta, out_emb, in_emb, k, *args, mode
                )
                yield f"kernelized_sparse_delta_backward {kernel} {mode} {shape}", partial(
                    kernelized.kernelized_sparse_delta_backward, delta, out_emb, in_emb, tau, *args, mode
                )
        for mode in MODES:
            yield f"sparsify {mode} {shape}", partial(kernelized.sparsify, delta, k, mode)
            yield f"sparsify_backward {mode} {shape}", partial(kernelized.sparsify_backward, delta, delta, tau, mode)


def op_calls() -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, call) for every configuration; labels end with the dtype."""
    for family in (_lowrank, _expm, _kernelized):
        for dtype in DTYPES:
            for label, call in family(dtype):
                yield f"{label} {str(dtype).removeprefix('torch.')}", call
