import pytest


@pytest.fixture
def emulator():
    """The extension of the cuda_emulated backend, its schedule and compute capability set
    back to the defaults afterwards."""
    from tensor_peft import _cuda_emulated

    yield _cuda_emulated
    _cuda_emulated.set_schedule("forward", 0)
    _cuda_emulated.set_compute_capability(90)
