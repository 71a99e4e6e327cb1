"""Math helpers whose results on a GPU match what Triton's interpreter computes.

Compiled for a GPU, float32 ``tl.exp`` becomes a multiply by log2(e) and ``ex2.approx``
(relative error up to ~4e-6) and float32 ``/`` an approximate division (2 ulp); the
interpreter computes both with NumPy. ``exp`` uses libdevice's ``exp`` on a GPU (the CUDA
``expf``/``exp``, at most 2 ulp / 1 ulp) and ``div`` IEEE round-to-nearest division, so
the tolerances the tests check in the interpreter hold on a GPU too. libdevice is not
available in the interpreter, where ``tl.exp`` is already NumPy's ``exp``.

``scalar`` turns a kernel's float64-annotated scalar argument into the kernel's compute
dtype: Python floats reach a float64 kernel as float64 (unannotated they would arrive as
float32) and a float32 kernel rounds them once."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def exp(x):
    if INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def div(numerator, denominator):
    """numerator / denominator, correctly rounded in float32 too (both tensors of one dtype)."""
    if numerator.dtype == tl.float32:
        return tl.div_rn(numerator, denominator)
    else:
        return numerator / denominator


@triton.jit
def scalar(value, dtype: tl.constexpr):
    """A float64 kernel argument as a 0-d value of ``dtype``."""
    return tl.full((), value, dtype)
