"""Builds the compiled extensions with ninja, without importing torch.

- ``tensor_peft._C``: C++17 + OpenMP (csrc/cpu), always.
- ``tensor_peft._cuda``: CUDA (csrc/cuda: ``.cu`` by nvcc, the pybind11 binding by g++,
  linked against the static CUDA runtime), when nvcc is found or ``TENSOR_PEFT_CUDA=1``;
  ``TENSOR_PEFT_CUDA=0`` skips it. Once asked for or found, a CUDA error fails the build.

Neither includes torch headers (tensors cross as raw pointers), so the build needs only
pybind11 and ninja and works under pip's build isolation.
Switches: ``TENSOR_PEFT_CUDA_ARCHS`` (default "80;90", plus PTX of the newest),
``TENSOR_PEFT_CPU_ARCH`` (``-march``, default x86-64-v2 on x86_64), ``MAX_JOBS``.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CUDA_SWITCH = os.environ.get("TENSOR_PEFT_CUDA", "").strip()


def find_nvcc() -> Path | None:
    """nvcc on PATH, under $CUDA_HOME/bin, or under /usr/local/cuda/bin."""
    on_path = shutil.which("nvcc")
    candidates = [on_path] if on_path else []
    candidates += [Path(os.environ.get("CUDA_HOME", "/nonexistent")) / "bin/nvcc"]
    candidates += [Path("/usr/local/cuda/bin/nvcc")]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def cuda_home(nvcc: Path) -> Path:
    """The toolkit nvcc belongs to (nvcc may be a wrapper script on PATH)."""
    for candidate in (os.environ.get("CUDA_HOME"), nvcc.resolve().parent.parent, "/usr/local/cuda"):
        if candidate and (Path(candidate) / "include/cuda_runtime.h").is_file():
            return Path(candidate)
    raise RuntimeError(f"found {nvcc} but no CUDA toolkit (include/cuda_runtime.h); set CUDA_HOME")


def cpu_arch_flags() -> list[str]:
    arch = os.environ.get("TENSOR_PEFT_CPU_ARCH", "").strip()
    if not arch and platform.machine() in ("x86_64", "AMD64"):
        arch = "x86-64-v2"  # SSE4.2/POPCNT: every x86-64 CPU of the last 15 years
    return [f"-march={arch}"] if arch else []


def cuda_arch_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("TENSOR_PEFT_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


class NinjaBuildExt(build_ext):
    """Compiles each extension's sources in parallel with ninja and links it with g++."""

    def build_extension(self, ext: Extension) -> None:
        build_dir = Path(self.build_temp) / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        compile_flags = ext.extra_compile_args
        rules = [
            "rule cxx",
            f"  command = c++ -MMD -MF $out.d {shlex.join(compile_flags['cxx'])} -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "rule link",
            f"  command = c++ -shared $in -o $out {shlex.join(ext.extra_link_args)}",
        ]
        if "nvcc" in compile_flags:
            rules += [
                "rule nvcc",
                f"  command = {shlex.join(compile_flags['nvcc'])} -c $in -o $out",
            ]
        edges, objects = [], []
        for source in map(Path, ext.sources):
            obj = build_dir / (source.name + ".o")
            rule = "nvcc" if source.suffix == ".cu" else "cxx"
            edges.append(f"build {obj}: {rule} {(ROOT / source).resolve()}")
            objects.append(str(obj))
        edges.append(f"build {output}: link {' '.join(objects)}")
        (build_dir / "build.ninja").write_text("\n".join(rules + edges) + "\n")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([ninja_executable(), "-C", str(build_dir), "-j", jobs], check=True)


def ninja_executable() -> str:
    try:
        import ninja

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        found = shutil.which("ninja")
        if not found:
            raise RuntimeError("ninja is needed to build tensor_peft: pip install ninja")
        return found


def extensions() -> list[Extension]:
    includes = [str(ROOT / "csrc/include"), pybind11.get_include(), sysconfig.get_paths()["include"]]
    cxx = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fopenmp", *cpu_arch_flags()]
    cxx += [f"-I{path}" for path in includes]
    march = next((f[len("-march="):] for f in cpu_arch_flags()), "default")
    cpu = Extension(
        "tensor_peft._C",
        sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cpu").glob("*.cpp")),
        extra_compile_args={"cxx": cxx + [f'-DTP_MARCH="{march}"']},
        extra_link_args=["-fopenmp"],
    )
    if CUDA_SWITCH == "0":
        return [cpu]
    nvcc = find_nvcc()
    if nvcc is None:
        if CUDA_SWITCH == "1":
            raise RuntimeError(
                "TENSOR_PEFT_CUDA=1 but nvcc was not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"
            )
        print("tensor_peft: nvcc not found, building without the CUDA extension", file=sys.stderr)
        return [cpu]
    home = cuda_home(nvcc)
    archs = os.environ.get("TENSOR_PEFT_CUDA_ARCHS", "80;90")
    cuda_includes = [f"-I{path}" for path in [*includes, home / "include"]]
    cuda = Extension(
        "tensor_peft._cuda",
        sources=sorted(
            str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cuda").iterdir() if p.suffix in (".cpp", ".cu")
        ),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", *cuda_includes, f'-DTP_CUDA_ARCHS="{archs}"'],
            "nvcc": [
                str(nvcc), "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                "-Xcompiler", "-fPIC", *cuda_arch_flags(), *cuda_includes,
            ],  # fmt: skip
        },
        extra_link_args=[f"-L{home / 'lib64'}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"],
    )
    return [cpu, cuda]


setup(ext_modules=extensions(), cmdclass={"build_ext": NinjaBuildExt})
