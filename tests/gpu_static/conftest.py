import os
import shutil

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_static: the ahead-of-time GPU compile check (about 10 minutes)")


@pytest.fixture(scope="module")
def compile_env(tmp_path_factory):
    """The environment of a process that compiles for the GPU ahead of time: the
    interpreter off, a cold Triton cache of its own (compile times are real), removed
    afterwards. Skips where Triton's NVIDIA backend or its ptxas is missing."""
    try:
        from tensor_peft.gpu_report.triton_aot import ptxas_path

        if not os.path.isfile(ptxas_path(90)):
            pytest.skip("triton's ptxas is missing")
    except ImportError as error:
        pytest.skip(f"triton has no NVIDIA backend here ({error})")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    cache = tmp_path_factory.mktemp("cache")
    env["TRITON_CACHE_DIR"] = str(cache)
    yield env
    shutil.rmtree(cache, ignore_errors=True)
