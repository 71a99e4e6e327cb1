"""Resource usage of the CUDA kernels (``csrc/cuda``) as the build compiled them: the
SASS of every architecture in the built extension ``tensor_peft._cuda``, read by
``cuobjdump -res-usage`` (registers, stack frame, static shared memory per kernel).
Spills live in the stack frame, so a kernel with no stack frame does not spill."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

_FUNCTION = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuobjdump_path() -> str | None:
    """cuobjdump on PATH, in CUDA's bin, or the one Triton bundles."""
    candidates = [shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and Path(c).is_file()), None)


def built_extension() -> Path | None:
    """The file of the built ``tensor_peft._cuda``, if there is one."""
    import importlib.util

    spec = importlib.util.find_spec("tensor_peft._cuda")
    return Path(spec.origin) if spec and spec.origin else None


def demangle(names: list[str]) -> list[str]:
    """C++ names from mangled ones (unchanged where c++filt is missing)."""
    if not names or shutil.which("c++filt") is None:
        return names
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def resource_rows(extension: Path, archs: list[int]) -> list[dict]:
    """One row per kernel × arch of ``extension`` (archs it was not built for are absent)."""
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit or triton's bundled copy)")
    rows = []
    for arch in archs:
        result = subprocess.run([tool, "-res-usage", "-arch", f"sm_{arch}", str(extension)], capture_output=True,
                                text=True)  # fmt: skip
        if result.returncode != 0:
            rows.append({"kernel": extension.name, "config": "", "arch": arch,
                         "status": f"error: cuobjdump: {result.stderr.strip()[-300:]}"})  # fmt: skip
            continue
        found = _FUNCTION.findall(result.stdout)
        for (name, registers, stack, shared, _), readable in zip(found, demangle([f[0] for f in found])):
            kernel, _, config = readable.removeprefix("void ").partition("<")
            source = re.search(r"_\d+_([A-Za-z]\w*?)_cu_", name)
            rows.append({
                "kernel": f"{source.group(1) if source else ''}.cu {kernel.split('::')[-1]}",
                "config": ("<" + config.split(">(")[0] + ">") if config else "",
                "arch": arch, "status": "ok", "registers": int(registers), "stack_bytes": int(stack),
                "shared_bytes": int(shared),
            })  # fmt: skip
    return rows
