"""The interface of the compiled extensions: every function names its arguments (callers
pass them by keyword), and the numbers the kernels take for a SNELL kernel, a
sparsification mode and a low-rank epilogue, defined once in the C++ headers
(csrc/include/tensor_peft/) and exported by each extension, match the Python tables the
triton backend (which runs without the extensions) numbers them by."""

from __future__ import annotations

import pytest

from tensor_peft.backends import native
from tensor_peft.backends.native import kernel_id, mode_id
from tensor_peft.config import KERNELS, MODES

each_extension = pytest.mark.parametrize("built", [native.C, native.CUDA, native.CUDA_EMULATED], ids=lambda e: e.name)


def _extension(built: native.Extension):
    try:
        return built.module()
    except ImportError as error:
        pytest.skip(f"{built.name} does not load here ({error})")


@each_extension
def test_extension_ids_match_the_python_tables(built):
    extension = _extension(built)
    assert extension.KERNEL_IDS == {kernel: number for number, kernel in enumerate(KERNELS)}
    assert extension.MODE_IDS == {mode: number for number, mode in enumerate(("none", *MODES))}
    for kernel in KERNELS:
        assert kernel_id(kernel, extension) == kernel_id(kernel)
    for mode in (None, *MODES):
        assert mode_id(mode, extension) == mode_id(mode)


@each_extension
def test_extension_epilogue_ids_match_the_triton_table(built):
    extension = _extension(built)
    pytest.importorskip("triton")
    from tensor_peft.backends.triton.lowrank import EPILOGUE

    assert extension.EPILOGUE_IDS == EPILOGUE


@each_extension
def test_every_extension_function_names_its_arguments(built):
    extension = _extension(built)
    functions = [getattr(extension, f) for f in dir(extension) if callable(getattr(extension, f))]
    assert len(functions) > 10
    for function in functions:
        signature = function.__doc__.splitlines()[0]
        assert "arg0" not in signature, signature
