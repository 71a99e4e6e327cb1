"""Command line: ``python -m tensor_peft info`` reports versions, which compiled
extensions were built, and which backends can run here (and why the others cannot);
``python -m tensor_peft bench`` runs the benchmark suites and writes their results;
``python -m tensor_peft demo`` fine-tunes a small CNN to a shifted domain with each method;
``python -m tensor_peft gpu-report --static`` compiles every GPU kernel ahead of time and
reports registers, spills, shared memory and compile times (no GPU needed)."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from pathlib import Path

import torch

import tensor_peft
from tensor_peft.backends import native, registry


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError as error:
        return f"not installed ({error})"


def _extension(extension: native.Extension) -> str:
    """One line on a compiled extension: its build facts, or why it does not load."""
    try:
        module = extension.module()
    except ImportError as error:
        return f"not available ({error})"
    facts = ", ".join(f"{key}={value}" for key, value in module.build_info().items())
    if extension is native.CUDA:
        try:
            facts += f", devices={module.device_count()}"
        except RuntimeError as error:
            facts += f", devices: none ({error})"
    return f"built ({facts})"


def info() -> str:
    lines = [
        f"tensor_peft {tensor_peft.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda or 'none'}, GPU {'yes' if torch.cuda.is_available() else 'no'}), "
        f"triton {_version('triton')}, numpy {_version('numpy')}",
        "extensions:",
        *(f"  {extension.name.removeprefix('tensor_peft.'):14} {_extension(extension)}"
          for extension in (native.C, native.CUDA, native.CUDA_EMULATED)),
        "backends (tensor device: runs, or why not):",
    ]
    for name in registry.NAMES:
        ops = registry.implemented_ops(name)
        forward_ops = [op for op in ops if not op.endswith("_backward")]
        lines.append(f"  {name:13} kernels: {', '.join(forward_ops) or 'none (its kernel modules do not load)'}")
        for device_type in ("cpu", "cuda"):
            reason = registry.why_unavailable(name, device_type)
            lines.append(f"    {device_type:5} {'runs' if reason is None else 'no: ' + reason}")
    requested = registry.requested()
    lines.append(
        f"selection: {requested!r} (asked for)" if requested else
        "selection: default order (cpu tensors: cpu, reference; cuda tensors: cuda, triton, reference)"
    )  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tensor_peft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, built extensions, backends that can run here")
    bench = commands.add_parser("bench", help="run benchmarks/ and write benchmarks/results/<name>.{json,md}")
    bench.add_argument("--name", help="results file name (default: the GPU's or this host's name)")
    bench.add_argument("-k", dest="select", help="pytest -k expression selecting benchmarks")
    bench.add_argument("--out", type=Path, help="results folder (default: benchmarks/results)")
    demo = commands.add_parser("demo", help="fine-tune a digit CNN to a shifted domain with every method")
    demo.add_argument("--out", type=Path, default=Path("demo_results"), help="folder for the table and the plot")
    demo.add_argument("--methods", type=lambda text: text.split(","), help="comma-separated subset of the methods")
    demo.add_argument("--epochs", type=int, default=40, help="adaptation epochs per method")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a tiny setting (for tests)")
    report = commands.add_parser("gpu-report", help="compile the GPU kernels ahead of time; write static.{json,md}")
    report.add_argument("--static", action="store_true", required=True, help="the ahead-of-time check (no GPU)")
    report.add_argument("--arch", type=lambda text: [int(a) for a in text.split(",")], default=[80, 90],
                        help="comma-separated compute capabilities (default 80,90)")  # fmt: skip
    report.add_argument("--out", type=Path, default=Path("gpu_report"), help="folder for static.json and static.md")
    report.add_argument("-k", dest="select", help="only the op configurations whose label contains this")
    report.add_argument("--cuda-extension", type=Path, help="a built _cuda to read (default: the installed one)")
    args = parser.parse_args(argv)
    if args.command == "gpu-report":
        from tensor_peft.gpu_report import main as gpu_report

        return gpu_report(args.arch, args.out, args.select, args.cuda_extension)
    if args.command == "demo":
        from tensor_peft.demo import main as run_demo

        return run_demo(args.out, args.methods, args.epochs, args.seed, args.quick)
    if args.command == "bench":
        from tensor_peft.bench import main as run_benchmarks

        return run_benchmarks(args.name, args.select, out=args.out)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
