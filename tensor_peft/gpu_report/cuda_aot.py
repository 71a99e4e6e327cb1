"""Resource usage of the CUDA kernels (``csrc/cuda``): each ``.cu`` compiled for one
architecture by nvcc with ``-Xptxas -v`` (the flags of setup.py), the log parsed per
kernel."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .triton_aot import parse_ptxas

ROOT = Path(__file__).resolve().parents[2]


def find_nvcc() -> str | None:
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).is_file()), None)


def demangle(names: list[str]) -> list[str]:
    """C++ names from mangled ones (unchanged where c++filt is missing)."""
    if not names or shutil.which("c++filt") is None:
        return names
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def compile_rows(arch: int, nvcc: str) -> list[dict]:
    """One row per ``__global__`` kernel of ``csrc/cuda/*.cu`` for ``sm_<arch>``."""
    rows = []
    for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        command = [
            nvcc, "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xptxas", "-v",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{ROOT / 'csrc' / 'include'}", "-c", str(source),
        ]  # fmt: skip
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:
            result = subprocess.run([*command, "-o", f"{folder}/out.o"], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            rows.append({"kernel": source.name, "config": "", "arch": arch, "status": "error: " + result.stderr[-2000:],
                         "compile_s": round(seconds, 1)})  # fmt: skip
            continue
        usage = parse_ptxas(result.stderr + result.stdout)
        for name, readable in zip(usage, demangle(list(usage))):
            kernel, _, config = readable.partition("<")
            rows.append({
                "kernel": f"{source.stem}.cu {kernel.removeprefix('void ').split('::')[-1]}",
                "config": ("<" + config.split(">(")[0] + ">") if config else "",
                "arch": arch, "status": "ok", "compile_s": round(seconds, 1),
                "registers": usage[name]["registers"], "spill_bytes": usage[name]["spill_bytes"],
                "stack_bytes": usage[name]["stack_bytes"], "shared_bytes": usage[name]["static_shared_bytes"],
            })  # fmt: skip
    return rows
