"""The interface of the compiled extensions: every function names its arguments (callers
pass them by keyword), and the numbers the kernels take for a SNELL kernel, a
sparsification mode and a low-rank epilogue, defined once in the C++ headers
(csrc/include/tensor_peft/) and exported by each extension, match the Python tables the
triton backend (which runs without the extensions) numbers them by."""

from __future__ import annotations

import importlib

import pytest

from tensor_peft.backends.kernelized_ops import kernel_id, mode_id
from tensor_peft.config import KERNELS, MODES


def _extension(name: str):
    try:
        return importlib.import_module(f"tensor_peft.{name}")
    except ImportError as error:
        pytest.skip(f"tensor_peft.{name} does not load here ({error})")


@pytest.mark.parametrize("name", ["_C", "_cuda", "_cuda_emulated"])
def test_extension_ids_match_the_python_tables(name):
    extension = _extension(name)
    assert extension.KERNEL_IDS == {kernel: number for number, kernel in enumerate(KERNELS)}
    assert extension.MODE_IDS == {mode: number for number, mode in enumerate(("none", *MODES))}
    for kernel in KERNELS:
        assert kernel_id(kernel, extension) == kernel_id(kernel)
    for mode in (None, *MODES):
        assert mode_id(mode, extension) == mode_id(mode)


@pytest.mark.parametrize("name", ["_C", "_cuda", "_cuda_emulated"])
def test_extension_epilogue_ids_match_the_triton_table(name):
    extension = _extension(name)
    pytest.importorskip("triton")
    from tensor_peft.backends.triton.lowrank import EPILOGUE

    assert extension.EPILOGUE_IDS == EPILOGUE


@pytest.mark.parametrize("name", ["_C", "_cuda", "_cuda_emulated"])
def test_every_extension_function_names_its_arguments(name):
    extension = _extension(name)
    functions = [getattr(extension, f) for f in dir(extension) if callable(getattr(extension, f))]
    assert len(functions) > 10
    for function in functions:
        signature = function.__doc__.splitlines()[0]
        assert "arg0" not in signature, signature
