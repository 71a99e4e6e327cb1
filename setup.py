"""Builds the compiled extensions with ninja, without importing torch.

- ``tensor_peft._C``: C++17 + OpenMP (csrc/cpu), always.
- ``tensor_peft._cuda``: CUDA (csrc/cuda: ``.cu`` by nvcc, the pybind11 binding by g++,
  linked against the static CUDA runtime), when nvcc is found or ``TENSOR_PEFT_CUDA=1``;
  ``TENSOR_PEFT_CUDA=0`` skips it. Once asked for or found, a CUDA error fails the build.
- ``tensor_peft._cuda_emulated``: the same csrc/cuda sources compiled by g++ as C++ with
  CUDA's execution model emulated on the host (csrc/cuda/emulation.h), only when
  ``TENSOR_PEFT_CUDA_EMULATION=1``; needs no CUDA toolkit.

None includes torch headers (tensors cross as raw pointers), so the build needs only
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
EMULATION_SWITCH = os.environ.get("TENSOR_PEFT_CUDA_EMULATION", "").strip()
OPTIONAL_EXTENSIONS = ("tensor_peft._cuda", "tensor_peft._cuda_emulated")


def find_nvcc() -> Path | None:
    """nvcc on PATH, else under $CUDA_HOME/bin ($CUDA_HOME defaults to /usr/local/cuda)."""
    candidates = [shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin/nvcc")]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def cuda_home(nvcc: Path) -> Path:
    """The toolkit nvcc belongs to (nvcc may be a wrapper script on PATH)."""
    for candidate in (os.environ.get("CUDA_HOME"), nvcc.resolve().parent.parent, "/usr/local/cuda"):
        if candidate and (Path(candidate) / "include/cuda_runtime.h").is_file():
            return Path(candidate)
    raise RuntimeError(f"found {nvcc} but no CUDA toolkit (include/cuda_runtime.h); set CUDA_HOME")


def cpu_arch() -> str | None:
    """``-march`` for the CPU extension: $TENSOR_PEFT_CPU_ARCH, else a safe x86-64 baseline."""
    arch = os.environ.get("TENSOR_PEFT_CPU_ARCH", "").strip()
    if not arch and platform.machine() in ("x86_64", "AMD64"):
        arch = "x86-64-v2"  # SSE4.2/POPCNT: every x86-64 CPU of the last 15 years
    return arch or None


def cuda_archs() -> list[str]:
    """$TENSOR_PEFT_CUDA_ARCHS as a list, e.g. ["80", "90"]."""
    archs = [a.strip() for a in os.environ.get("TENSOR_PEFT_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    if not archs:
        raise RuntimeError("TENSOR_PEFT_CUDA_ARCHS is empty; give e.g. '80;90'")
    return archs


def cuda_arch_flags(archs: list[str]) -> list[str]:
    """SASS for each arch, plus PTX of the newest so that newer GPUs can JIT it."""
    newest = max(archs, key=lambda a: int(a.rstrip("af")))  # "90a" / "100f" are arch variants
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def sources(folder: str, *suffixes: str) -> list[str]:
    """Files of csrc/<folder> with these suffixes, relative to the project (as setuptools wants)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / folder).iterdir() if p.suffix in suffixes)


class NinjaBuildExt(build_ext):
    """Compiles each extension's sources in parallel with ninja and links it with g++.

    ``extra_compile_args`` is a dict: "cxx" (g++ flags) and, for CUDA, "nvcc" (the nvcc
    command and its flags; without it, .cu files go to g++ with the "cxx" flags). The .so
    goes to ``get_ext_fullpath``, which setuptools points at the wheel's tree or, for an
    editable install, at the source tree.
    """

    def run(self) -> None:
        """Also deletes old builds of a skipped _cuda or _cuda_emulated: setuptools would ship a
        stale one left in build/lib by an earlier build, and an editable install would import one
        left in the tree."""
        built = {ext.name for ext in self.extensions}
        for name in OPTIONAL_EXTENSIONS:
            if name in built:
                continue
            stale = [Path(self.get_ext_fullpath(name))]
            if self.editable_mode:
                stale.append(ROOT / self.get_ext_filename(name))
            for path in stale:
                path.unlink(missing_ok=True)
        super().run()

    def build_extension(self, ext: Extension) -> None:
        build_dir = (Path(self.build_temp) / ext.name).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        flags = ext.extra_compile_args
        rules = [
            "rule cxx",
            f"  command = c++ -MMD -MF $out.d {shlex.join(flags['cxx'])} -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "rule link",
            f"  command = c++ -shared $in -o $out {shlex.join(ext.extra_link_args)}",
        ]
        if "nvcc" in flags:
            rules += [
                "rule nvcc",
                f"  command = {shlex.join(flags['nvcc'])} -MD -MF $out.d -c $in -o $out",
                "  depfile = $out.d",
                "  deps = gcc",
            ]
        edges, objects = [], []
        for source in map(Path, ext.sources):
            obj = build_dir / (source.name + ".o")
            rule = "nvcc" if source.suffix == ".cu" and "nvcc" in flags else "cxx"
            edges.append(f"build {obj}: {rule} {ROOT / source}")
            objects.append(str(obj))
        edges.append(f"build {output}: link {' '.join(objects)}")
        (build_dir / "build.ninja").write_text("\n".join(rules + edges) + "\n")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([ninja_executable(), "-C", str(build_dir), "-j", jobs], check=True)


def ninja_executable() -> str:
    """The ninja binary of the ``ninja`` Python package (a build requirement), else one on PATH."""
    try:
        import ninja

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        found = shutil.which("ninja")
        if not found:
            raise RuntimeError("ninja is needed to build tensor_peft: pip install ninja")
        return found


def extensions() -> list[Extension]:
    """_C always; _cuda as TENSOR_PEFT_CUDA and the presence of nvcc decide; _cuda_emulated
    when TENSOR_PEFT_CUDA_EMULATION=1."""
    if CUDA_SWITCH not in ("", "0", "1"):
        raise RuntimeError(f"TENSOR_PEFT_CUDA={CUDA_SWITCH!r}: use 1 (require CUDA), 0 (skip it) or unset")
    if EMULATION_SWITCH not in ("", "0", "1"):
        raise RuntimeError(f"TENSOR_PEFT_CUDA_EMULATION={EMULATION_SWITCH!r}: use 1 (build it), 0 or unset (skip it)")
    include_dirs = (ROOT / "csrc/include", pybind11.get_include(), sysconfig.get_paths()["include"])
    includes = [f"-I{path}" for path in include_dirs]
    headers = sources("include/tensor_peft", ".h")  # in `depends` so that an sdist carries them
    cxx = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", *includes]
    march = cpu_arch()
    march_flags = [f"-march={march}"] if march else []
    cpu = Extension(
        "tensor_peft._C",
        sources=sources("cpu", ".cpp"),
        depends=headers + sources("cpu", ".h"),
        # -fno-math-errno, -fno-trapping-math: nothing reads errno or the floating-point
        # exception flags, and without them sqrt loops and loops with selects (vector_exp's
        # clamps, the masks) stay scalar; results are unchanged (IEEE rounding, inf and NaN).
        # -Wno-psabi: GCC warns that lanes.h's 32-byte vectors would be passed by value
        # differently with and without AVX; between code of different ISAs they go by pointer
        extra_compile_args={
            "cxx": [
                *cxx, "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wno-psabi", *march_flags,
                f'-DTP_MARCH="{march or "default"}"',
            ]
        },
        extra_link_args=["-fopenmp"],
    )
    built = [cpu]
    if EMULATION_SWITCH == "1":
        # -x c++: the .cu files are C++ to g++ (launch.h includes the emulation)
        emulated_flags = [
            "-x", "c++", "-DTP_CUDA_EMULATION", "-DTP_CUDA_MODULE=_cuda_emulated", '-DTP_CUDA_ARCHS="emulated"',
        ]  # fmt: skip
        built.append(
            Extension(
                "tensor_peft._cuda_emulated",
                sources=sources("cuda", ".cpp", ".cu"),
                depends=headers + sources("cuda", ".h"),
                extra_compile_args={"cxx": [*cxx, *emulated_flags]},
            )
        )
    cuda = cuda_extension(includes, cxx, headers)
    return built + ([cuda] if cuda else [])


def cuda_extension(includes: list[str], cxx: list[str], headers: list[str]) -> Extension | None:
    """_cuda, or None when TENSOR_PEFT_CUDA=0 or, unset, nvcc is missing."""
    if CUDA_SWITCH == "0":
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        if CUDA_SWITCH == "1":
            raise RuntimeError(
                "TENSOR_PEFT_CUDA=1 but nvcc was not found (looked on PATH and in $CUDA_HOME/bin, "
                "CUDA_HOME defaulting to /usr/local/cuda): install the CUDA toolkit or set CUDA_HOME, "
                "or build without CUDA with TENSOR_PEFT_CUDA=0"
            )
        print("tensor_peft: nvcc not found, building without the CUDA extension", file=sys.stderr)
        return None
    home = cuda_home(nvcc)
    archs = cuda_archs()
    cuda_includes = [*includes, f"-I{home / 'include'}"]
    return Extension(
        "tensor_peft._cuda",
        sources=sources("cuda", ".cpp", ".cu"),
        depends=headers + sources("cuda", ".h"),
        extra_compile_args={
            "cxx": [*cxx, f"-I{home / 'include'}", f'-DTP_CUDA_ARCHS="{";".join(archs)}"'],
            "nvcc": [
                str(nvcc), "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo",
                "-Xcompiler", "-fPIC,-fvisibility=hidden", *cuda_arch_flags(archs), *cuda_includes,
            ],  # fmt: skip
        },
        extra_link_args=[f"-L{home / 'lib64'}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"],
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": NinjaBuildExt})
