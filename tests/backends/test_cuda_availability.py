"""The cuda backend's availability: the driver and the GPUs' architectures are checked
before the backend counts as able to run, so that the default order moves on to Triton
instead of every op raising. The driver and the extension are faked (no GPU here)."""

import types

import pytest
import torch

from tensor_peft import __main__ as cli
from tensor_peft.backends import cuda, native, registry

BUILT_13 = {"cuda_runtime_version": 13000, "nvcc_version": "13.0", "archs": "80;90"}


@pytest.mark.parametrize(
    "driver, capability, runs",
    [
        (13000, (9, 0), True),
        (13020, (8, 0), True),
        (13000, (8, 6), True),    # sm_80 machine code runs on 8.6
        (13000, (12, 0), True),   # compute_90 PTX compiled by the driver
        (12080, (9, 0), False),   # a CUDA 12 driver (R570) cannot run the CUDA 13 runtime
        (0, (9, 0), False),       # no driver
        (13000, (7, 5), False),   # older than every arch built
    ],
)
def test_incompatibility_by_driver_and_architecture(driver, capability, runs):
    reason = cuda.incompatibility(BUILT_13, driver, [capability])
    assert (reason is None) == runs, reason


def test_arch_variants_run_only_where_cuda_runs_them():
    exact = {**BUILT_13, "archs": "90a"}
    assert cuda.incompatibility(exact, 13000, [(9, 0)]) is None
    assert "compute capability 10.0" in cuda.incompatibility(exact, 13000, [(10, 0)])
    family = {**BUILT_13, "archs": "100f"}
    assert cuda.incompatibility(family, 13000, [(10, 3)]) is None
    assert cuda.incompatibility(family, 13000, [(12, 0)]) is not None


def test_reason_names_the_driver_and_the_fix():
    reason = cuda.incompatibility(BUILT_13, 12040, [(9, 0)])
    assert "CUDA up to 12.4" in reason and "CUDA 13.0 runtime" in reason and "torch.version.cuda" in reason
    assert "GPU 1 (compute capability 7.0)" in cuda.incompatibility(BUILT_13, 13000, [(9, 0), (7, 0)])


@pytest.fixture
def fake_gpu_with_old_driver(monkeypatch):
    """A GPU that torch runs on, an extension built with CUDA 13, a driver for CUDA 12.4."""
    extension = types.SimpleNamespace(build_info=lambda: dict(BUILT_13), driver_version=lambda: 12040,
                                      device_count=lambda: 1)  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    built = native.Extension(native.CUDA.name, lambda: extension)
    monkeypatch.setattr(cuda, "CUDA", built)
    monkeypatch.setattr(native, "CUDA", built)
    registry._reason_for_device.cache_clear()
    yield
    registry._reason_for_device.cache_clear()


@pytest.mark.usefixtures("fake_gpu_with_old_driver")
def test_an_old_driver_moves_the_default_order_on_to_triton():
    assert "driver supports CUDA up to 12.4" in registry.why_unavailable("cuda", "cuda")
    if registry.why_unavailable("triton", "cuda") is None:
        assert registry.select("matrix_exp", "cuda")[0] == "triton"
    else:
        assert registry.select("matrix_exp", "cuda")[0] == "reference"
    assert "driver supports CUDA up to 12.4" in cli.info()
