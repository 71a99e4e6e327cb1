"""The GPU kernels that sum with float atomics, whose summation order (and so the last
bits of the result) varies from run to run, and the check that refuses them under
``torch.use_deterministic_algorithms(True)`` (a warning instead with ``warn_only=True``).

Float atomics: the backward kernels of the Tucker and LieRA hadamard ops (dU₀, dR) and of
SNELL's kernelized ops (embedding, coefficient and kernel-parameter gradients), on the
triton, cuda and cuda_emulated backends (the emulator runs the cuda launchers). Every
forward, ``matrix_exp`` and its backward, ``sparsify`` and its backward are deterministic
(the radix select counts with integer atomics). The cpu and reference backends are
deterministic throughout."""

from __future__ import annotations

import warnings

import torch

NONDETERMINISTIC = {
    "tucker_delta_backward", "lowrank_hadamard_merge_backward", "kernelized_delta_backward",
    "kernelized_sparse_delta_backward", "sparse_linear_backward",
}  # fmt: skip
"""The ops whose GPU kernels sum with float atomics (on ``ATOMIC_BACKENDS``)."""
ATOMIC_BACKENDS = ("triton", "cuda", "cuda_emulated")


def check_deterministic(op: str, backend: str) -> None:
    """Raises RuntimeError (warns, with ``warn_only``) when deterministic algorithms are
    requested and ``op`` on ``backend`` sums with float atomics (``NONDETERMINISTIC``)."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    if op not in NONDETERMINISTIC or backend not in ATOMIC_BACKENDS:
        return
    message = (
        f"{op} on the {backend} backend sums with float atomics (the order, and the last bits of the "
        f"result, vary between runs) and torch.use_deterministic_algorithms(True) is set; run it on the "
        f"cpu or reference backend (tensor_peft.backends.use('reference'))"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)
