"""The op calls whose Triton launches the static check compiles: typical shapes of each
method, in float32 and float64, on ``meta`` tensors (no data: only the launchers' choices
of grid, block sizes and constexprs matter), and the shapes that specialize a kernel
differently (Triton specializes an integer argument equal to 1 into a constant, integers
and pointers on whether they are multiples of 16, integers over 2³¹ − 1 to int64).

- Tucker / LieRA hadamard (``lowrank.py``): a 4096×4096 linear at r = 1 (r0 = 1), 8 and
  64, a 512×512×3×3 conv at r = 8 and 64, GPT-2's 768×50257 (n not a multiple of 16) and
  a 65536×65536 linear (2³² entries) at r = 8; ``tucker_merge`` also with a bfloat16 and
  a float16 weight under the float32 and float64 factors;
- ``matrix_exp`` with and without the derivative: n = 1, 3, 8, 16, 32, 64, 128, and a
  batch of 32×32 matrices of over 2³¹ entries;
- SNELL (``kernelized.py``, ``select.py``): 768×3072 and 4096×11008 at r = 8 in two chunks of 4, and at
  768×3072 the other chunk layouts (r = 8 in one chunk, r = 8 in eight chunks of 1, r = 64
  in two chunks of 32: BP = 32), every kernel function, dense, sparsified (hard, soft)
  and sparsify alone, forward and backward; 768×50257 (n not a multiple of 16) at r = 8
  in two chunks, and the threshold search on 50000×50000 (over 2³¹ entries: int64
  counts). The sparsified calls launch every kernel of the threshold search
  (``count_kernel``, ``refine_kernel`` with and without the compaction, ``search_kernel``:
  which source a refine pass reads is decided on the device, so one compile covers both)."""

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
    layers = [("linear 4096x4096", (4096, 4096), (1, 8, 64)), ("conv 512x512x3x3", (512, 512, 3, 3), (8, 64)),
              ("linear 768x50257", (768, 50257), (8,)), ("linear 65536x65536", (65536, 65536), (8,))]  # fmt: skip
    for layer, weight_shape, ranks in layers:
        for r in ranks:
            core = _empty(r, r, *weight_shape[2:], dtype=dtype)
            factors = [_empty(d, r, dtype=dtype) for d in weight_shape[:2]]
            factors += [_empty(d, d, dtype=dtype) for d in weight_shape[2:]]
            weight = _empty(*weight_shape, dtype=dtype)
            B, A = _empty(weight_shape[0], r, dtype=dtype), _empty(r, *weight_shape[1:], dtype=dtype)
            name = f"{layer} r={r}"
            yield f"tucker_delta {name}", partial(kernel("tucker_delta"), core, factors, 0.5)
            yield f"tucker_merge {name}", partial(kernel("tucker_merge"), weight, core, factors, 0.5)
            for half in (torch.bfloat16, torch.float16):  # a half model's weight, read and written in its dtype
                half_weight = _empty(*weight_shape, dtype=half)
                yield f"tucker_merge {str(half).removeprefix('torch.')} weight {name}", partial(
                    kernel("tucker_merge"), half_weight, core, factors, 0.5
                )
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

    for batch, n in ((64, 1), (64, 3), (64, 8), (64, 16), (64, 32), (64, 64), (64, 128), (2**21 + 1, 32)):
        A = _empty(batch, n, n, dtype=dtype)
        name = f"n={n}" if batch == 64 else f"n={n} batch={batch}"
        yield f"matrix_exp {name}", partial(expm.matrix_exp, A)
        yield f"matrix_exp_backward {name}", partial(expm.matrix_exp_backward, A, A)


def _snell_calls(dtype: torch.dtype, m: int, n: int, chunks: int, width: int):
    """Every SNELL op at an (m, n) weight with r = chunks·width."""
    from ..backends.kernelized_ops import KernelProblem
    from ..backends.triton import kernelized

    coeff, params = _empty(chunks, dtype=dtype), _empty(3, dtype=dtype)
    out_emb, in_emb = _empty(chunks, m, width, dtype=dtype), _empty(chunks, n, width, dtype=dtype)
    delta, tau = _empty(m, n, dtype=dtype), _empty(dtype=dtype)
    k = m * n // 2
    shape = f"{m}x{n} chunks={chunks} width={width}"
    for kernel in KERNELS:
        dense = KernelProblem(out_emb, in_emb, kernel, coeff, params, 1e-6)
        yield f"kernelized_delta {kernel} {shape}", partial(kernelized.kernelized_sparse_delta, dense, 0)
        yield f"kernelized_delta_backward {kernel} {shape}", partial(
            kernelized.kernelized_sparse_delta_backward, delta, dense, None
        )
        for mode in MODES:
            sparse = dense._replace(mode=mode)
            yield f"kernelized_sparse_delta {kernel} {mode} {shape}", partial(
                kernelized.kernelized_sparse_delta, sparse, k
            )
            yield f"kernelized_sparse_delta_backward {kernel} {mode} {shape}", partial(
                kernelized.kernelized_sparse_delta_backward, delta, sparse, tau
            )


def _sparsify_calls(dtype: torch.dtype, m: int, n: int):
    from ..backends.triton import select

    delta, tau = _empty(m, n, dtype=dtype), _empty(dtype=dtype)
    for mode in MODES:
        yield f"sparsify {mode} {m}x{n}", partial(select.sparsify, delta, m * n // 2, mode)
        yield f"sparsify_backward {mode} {m}x{n}", partial(select.sparsify_backward, delta, delta, tau, mode)


def _kernelized(dtype: torch.dtype) -> Iterator[tuple[str, Callable[[], object]]]:
    layouts = [(768, 3072, 2, 4), (4096, 11008, 2, 4), (768, 3072, 1, 8), (768, 3072, 8, 1), (768, 3072, 2, 32),
               (768, 50257, 2, 4)]  # fmt: skip
    for layout in layouts:
        yield from _snell_calls(dtype, *layout)
    for m, n in ((768, 3072), (4096, 11008), (768, 50257), (50000, 50000)):
        yield from _sparsify_calls(dtype, m, n)


def op_calls() -> Iterator[tuple[str, Callable[[], object]]]:
    """(label, call) for every configuration; labels end with the dtype."""
    for family in (_lowrank, _expm, _kernelized):
        for dtype in DTYPES:
            for label, call in family(dtype):
                yield f"{label} {str(dtype).removeprefix('torch.')}", call
