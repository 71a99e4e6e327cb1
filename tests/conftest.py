"""Test set-up: Triton's interpreter on machines without a GPU (it must be set before
any Triton kernel is defined), torch.compile's cache in this checkout, the devices tests
run on, and the backends that run an op."""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The compile cache's key does not hold a custom op's schema: a graph cached by another
# checkout of this package (other op signatures) would be reused. One cache per checkout.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "inductor"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_with(op: str) -> list[tuple[str, str]]:
    """(backend, device) pairs that can run here and have a kernel for ``op``."""
    from tensor_peft import backends

    return [(name, device) for device in DEVICES for name in backends.available(device)
            if op in backends.implemented_ops(name)]  # fmt: skip
