"""What the Triton kernel modules share: ``tile``, the 1-D grid over a matrix's tiles,
the compute dtype, and math whose results on a GPU match what Triton's interpreter computes.

Dtypes: the kernels take float16/bfloat16 tensors as well as float32/float64 ones
(the package's ``KERNEL_DTYPES``), loading each value converted to the compute dtype (``compute_type``:
float64 if any tensor of the call is, else float32), accumulating there (atomic adds into
scratch buffers of that dtype) and storing each result ``rounded`` once into its tensor's dtype.

``tile``: every grid dimension but x is limited to 65,535 programs, so the tiles of an
(m, n) matrix are numbered along x alone (limit 2^31 − 1), row-major.

Compiled for a GPU, float32 ``tl.exp`` becomes a multiply by log2(e) and ``ex2.approx``
(relative error up to ~4e-6) and float32 ``/`` an approximate division (2 ulp); the
interpreter computes both with NumPy. ``exp`` uses libdevice's ``exp`` on a GPU (the CUDA
``expf``/``exp``, at most 2 ulp / 1 ulp) and ``div`` IEEE round-to-nearest division, so
the tolerances the tests check in the interpreter hold on a GPU too. libdevice is not
available in the interpreter, where ``tl.exp`` is already NumPy's ``exp``.

``rounded`` stores a float32 value in float16/bfloat16 rounded to nearest even, as the
GPU's conversion and torch's ``.to`` round; the interpreter's own float32 → bfloat16
conversion truncates (its "rtne" mode rounds ties up), so bfloat16 is rounded here on the
float bits, the same on both.

``launch`` runs every kernel launch on its tensors' device: Triton launches on the
current CUDA device, so without the guard a layer on cuda:1 (a model spread over GPUs)
would run its kernel on GPU 0 with GPU 1's pointers.

``scalar`` turns a kernel's float64-annotated scalar argument into the kernel's compute
dtype: Python floats reach a float64 kernel as float64 (unannotated they would arrive as
float32) and a float32 kernel rounds them once."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


def compute_type(*tensors: torch.Tensor | None) -> tl.dtype:
    """The Triton dtype a kernel computes in for these tensors: float64 if one of them is,
    else float32 (``None`` entries are skipped)."""
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


@triton.jit
def exp(x):
    if INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def div(numerator, denominator):
    """numerator / denominator, correctly rounded in float32 too (tensors of one dtype,
    broadcast against each other)."""
    if denominator.dtype == tl.float32:
        numerator, denominator = tl.broadcast(numerator, denominator)
        return tl.div_rn(numerator, denominator)
    else:
        return numerator / denominator


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """x in ``dtype`` (x's own, or a narrower float type), rounded to nearest even."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        kept = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # ties to the even last kept bit
        kept = tl.where(x != x, 0x7FC0, kept)  # NaN stays a quiet NaN
        return kept.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def scalar(value, dtype: tl.constexpr):
    """A float64 kernel argument as a 0-d value of ``dtype``."""
    return tl.full((), value, dtype)


@triton.jit
def tile(m, n, BM: tl.constexpr, BN: tl.constexpr):
    """The rows and columns (int64) of this program's BM × BN tile of an (m, n) matrix."""
    index = tl.program_id(0).to(tl.int64)
    col_tiles = tl.cdiv(n, BN)
    rows = (index // col_tiles) * BM + tl.arange(0, BM)
    cols = (index % col_tiles) * BN + tl.arange(0, BN)
    return rows, cols


def tile_grid(m: int, n: int, BM: int, BN: int) -> tuple[int]:
    """The launch grid of ``tile``."""
    return (triton.cdiv(m, BM) * triton.cdiv(n, BN),)


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` with the tensors' CUDA device current (nothing
    to guard for CPU tensors in the interpreter or ``meta`` tensors in the static report)."""
    devices = {arg.device for arg in args if isinstance(arg, torch.Tensor)}
    if len(devices) != 1:
        raise ValueError(f"{kernel.__name__}: its tensors must be on one device, got {sorted(map(str, devices))}")
    (device,) = devices
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return kernel[grid](*args, **kwargs)
