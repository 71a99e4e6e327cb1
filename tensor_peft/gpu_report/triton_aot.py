"""Ahead-of-time compilation of the Triton kernels for NVIDIA GPUs on a machine without one.

Inside ``compiling_for(arch)`` a stand-in driver reports the target ``sm_<arch>`` and every
launch ``kernel[grid](...)`` goes through Triton's own ``JITFunction.run`` with
``warmup=True``: the launch binder a GPU launch uses specializes the arguments, the kernel
is compiled to PTX and cubin, nothing runs. The backends' op functions are called on
``meta`` tensors (shapes and dtypes, no data), so each launcher picks its grid, block sizes
and constexprs as it would for those shapes. Triton's interpreter must be off
(``TRITON_INTERPRET`` unset) before the kernels are defined."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import tempfile
import time
from typing import Any, Iterator

GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's grid.x, grid.y, grid.z
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block (opt-in)


@dataclasses.dataclass
class Launch:
    """One launch seen inside ``compiling_for``: the kernel, its grid and what compiling it gave."""

    kernel: str
    grid: tuple[int, ...]
    signature: dict[str, str]
    constexprs: dict[str, Any]
    divisible_by_16: set[str] = dataclasses.field(default_factory=set)  # arguments specialized as multiples of 16
    compiled: Any = None  # triton's CompiledKernel
    error: str | None = None
    compile_s: float = 0.0


class _TargetDriver:
    """What ``JITFunction.run`` asks the active driver, answered for a GPU that is not here."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # one compile cache per target

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compiling_for(arch: int) -> Iterator[list[Launch]]:
    """Within the block, Triton launches compile for ``sm_<arch>`` instead of running; the
    list yielded receives one ``Launch`` per launch (a failing compile is recorded, and
    the launcher goes on)."""
    from triton.runtime import jit
    from triton.runtime.driver import driver

    if not hasattr(jit.JITFunction, "run"):
        raise RuntimeError("triton's JITFunction has no run method: this triton is not supported")
    launches: list[Launch] = []
    original_run = jit.JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        record = Launch(f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.__name__}", tuple(grid), {}, {})
        start = time.perf_counter()
        try:
            record.compiled = original_run(self, *args, grid=grid, warmup=True, **kwargs)
            record.signature = dict(record.compiled.src.signature)
            record.constexprs = {self.arg_names[path[0]]: value for path, value in record.compiled.src.constants.items()}
            record.divisible_by_16 = {self.arg_names[path[0]] for path, attrs in record.compiled.src.attrs.items()
                                      if ["tt.divisibility", 16] in attrs}  # fmt: skip
        except Exception as error:  # recorded: the report shows every failing kernel
            record.error = f"{type(error).__name__}: {error}"
        record.compile_s = time.perf_counter() - start
        launches.append(record)

    previous = driver._active  # None until a real driver is asked for (there may be none)
    driver.set_active(_TargetDriver(arch))
    jit.JITFunction.run = compile_instead
    try:
        yield launches
    finally:
        jit.JITFunction.run = original_run
        driver.set_active(previous)


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself runs for ``arch``."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


_USAGE = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """``ptxas -v`` output → {function: registers, stack_bytes, spill_bytes, static_shared_bytes}."""
    functions: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        entry = re.search(r"(?:Compiling entry function|Function properties for) '?([^'\s]+)'?", line)
        if entry:
            current = functions.setdefault(entry.group(1), {"registers": 0, "stack_bytes": 0, "spill_bytes": 0,
                                                            "static_shared_bytes": 0})  # fmt: skip
        if current is None:
            continue
        if match := _FRAME.search(line):
            current["stack_bytes"] = int(match.group(1))
            current["spill_bytes"] = int(match.group(2)) + int(match.group(3))
        if match := _USAGE.search(line):
            current["registers"] = int(match.group(1))
        if match := _SMEM.search(line):
            current["static_shared_bytes"] = int(match.group(1))
    return functions


def ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers, stack and spill bytes of the one kernel in ``ptx`` (``ptxas -v``, the
    register-allocation option Triton passes)."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)  # sm_90a for Hopper
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        result = subprocess.run(
            [ptxas_path(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name={target}", source.name, "-o", source.name + ".o"],
            capture_output=True, text=True,
        )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {result.stderr[-2000:]}")
    (usage,) = parse_ptxas(result.stderr + result.stdout).values()
    return usage


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Within the block, Triton launches (compiled or interpreted kernels) run nothing and
    are recorded with their grids: a launcher's choices checked on ``meta`` tensors of any
    size, without a compile."""
    from triton.runtime import interpreter, jit

    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}", tuple(grid), {}, kwargs))

    originals = {kind: kind.run for kind in (jit.JITFunction, interpreter.InterpretedFunction)}
    for kind in originals:
        kind.run = record
    try:
        yield launches
    finally:
        for kind, run in originals.items():
            kind.run = run
