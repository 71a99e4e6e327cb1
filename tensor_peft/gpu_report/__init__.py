"""The static GPU report: every Triton kernel compiled ahead of time for NVIDIA targets
(sm_80, sm_90) with the signatures and constexprs its launchers use for typical shapes and
for the shapes that specialize a kernel differently (``configs.py``), through Triton's own launch binder (``triton_aot.py``; ``ptxas -v``
gives registers, spills, stack and static shared memory), and the CUDA kernels of the
built extension (``cuda_aot.py``: ``cuobjdump -res-usage``). No GPU is needed.

``python -m tensor_peft gpu-report --static [--arch 80,90] [--out DIR]`` writes
``static.json`` (one row per kernel × compiled specialization × arch) and ``static.md``.

Budgets a row is checked against (``problems``): it compiled, in at most
``COMPILE_BUDGET_S``; no spills; shared memory within the architecture's limit; every
grid dimension within CUDA's limits; a float64 kernel takes no float32 scalar; a CUDA
kernel outside ``expm.cu`` has no stack frame (so no spills; the expm kernels keep the
Padé coefficient tables, indexed by the degree each matrix needs, in one: reported)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

COMPILE_BUDGET_S = 30.0
CUDA_STACK_FREE = ("lowrank.cu", "kernelized.cu")
COLUMNS = ("kernel", "config", "arch", "status", "compile_s", "registers", "spill_bytes", "stack_bytes",
           "shared_bytes")  # fmt: skip


def specialization(launch) -> str:
    """The name of the specialization a launch compiled: the first pointer's dtype, the
    constexprs (with the integer arguments Triton made constants: a 1), the pointers of
    other dtypes, the int64 integers, the pointers and integers not specialized as
    multiples of 16 (``not÷16``), and num_warps and num_stages where they are not
    Triton's defaults (4, 3)."""
    pointers = {name: kind[1:] for name, kind in launch.signature.items() if kind.startswith("*")}
    main = next(iter(pointers.values()), "")
    others: dict[str, list[str]] = {}
    for name, dtype in pointers.items():
        if dtype != main:
            others.setdefault(dtype, []).append(name)
    integers = [name for name, kind in launch.signature.items() if kind in ("i32", "i64")]
    parts = [main, *(f"{name}={value}" for name, value in sorted(launch.constexprs.items()))]
    parts += [f"{','.join(names)}:{dtype}" for dtype, names in others.items()]
    int64 = [name for name in integers if launch.signature[name] == "i64"]
    if int64:
        parts.append(f"int64:{','.join(int64)}")
    unaligned = [name for name in [*pointers, *integers] if name not in launch.divisible_by_16]
    if unaligned:
        parts.append(f"not÷16:{','.join(unaligned)}")
    if launch.compiled is not None:
        options = launch.compiled.metadata
        parts += [f"{name}={getattr(options, name)}" for name, default in (("num_warps", 4), ("num_stages", 3))
                  if getattr(options, name) != default]  # fmt: skip
    return " ".join(parts)


def triton_rows(archs: list[int], select: str | None = None) -> list[dict]:
    """One row per Triton kernel × distinct compiled specialization × arch (every launch
    of every op call, named by ``specialization``), with the op calls that launch it
    (``used_by``) and the largest grid they asked for."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("gpu-report --static compiles for a GPU: unset TRITON_INTERPRET")
    from .configs import op_calls
    from .triton_aot import GRID_LIMITS, SHARED_LIMIT, compiling_for, ptxas_usage

    rows: dict[tuple, dict] = {}
    for arch in archs:
        with compiling_for(arch) as launches:
            for label, call in op_calls():
                if select and select not in label:
                    continue
                first = len(launches)
                try:
                    call()
                except Exception as error:  # a launcher that fails is a row of its own
                    rows[(arch, label)] = {"kernel": label, "config": "launcher", "arch": arch,
                                           "status": f"error: {type(error).__name__}: {error}", "used_by": [label]}  # fmt: skip
                for launch in launches[first:]:
                    config = specialization(launch)
                    key = (arch, launch.kernel, config)
                    compile_hash = None if launch.compiled is None else launch.compiled.hash
                    row = rows.get(key)
                    if row is not None and row["compile_hash"] != compile_hash:
                        row["status"] = f"error: two compiles named alike (also by {label}): name what differs"
                    if row is None:
                        row = rows[key] = {"kernel": launch.kernel, "config": config, "arch": arch,
                                           "status": "ok" if launch.error is None else f"error: {launch.error}",
                                           "compile_s": round(launch.compile_s, 2), "compile_hash": compile_hash,
                                           "used_by": [],
                                           "max_grid": [0, 0, 0],
                                           "scalars": {name: kind for name, kind in launch.signature.items()
                                                       if not kind.startswith("*") and kind != "constexpr"}}  # fmt: skip
                        if launch.compiled is not None:
                            usage = ptxas_usage(launch.compiled.asm["ptx"], arch)
                            row.update(registers=usage["registers"], spill_bytes=usage["spill_bytes"],
                                       stack_bytes=usage["stack_bytes"],
                                       shared_bytes=launch.compiled.metadata.shared + usage["static_shared_bytes"],
                                       shared_limit=SHARED_LIMIT[arch])  # fmt: skip
                    row["used_by"].append(label)
                    grid = (*launch.grid, 1, 1)[:3]
                    row["max_grid"] = [max(a, b) for a, b in zip(row["max_grid"], grid)]
                    row["grid_limits"] = list(GRID_LIMITS)
    return list(rows.values())


def problems(row: dict) -> list[str]:
    """What in ``row`` breaks a budget (empty when none does)."""
    found = []
    if row["status"] != "ok":
        return [row["status"][:300]]
    if row.get("compile_s", 0) > COMPILE_BUDGET_S:
        found.append(f"compile {row['compile_s']} s > {COMPILE_BUDGET_S} s")
    if row["kernel"].split()[0] in CUDA_STACK_FREE and row.get("stack_bytes", 0):
        found.append(f"{row['stack_bytes']} bytes of stack frame")
    if row.get("spill_bytes", 0):
        found.append(f"{row['spill_bytes']} bytes spilled")
    if "shared_limit" in row and row["shared_bytes"] > row["shared_limit"]:
        found.append(f"shared memory {row['shared_bytes']} > {row['shared_limit']}")
    for axis, (size, limit) in enumerate(zip(row.get("max_grid", ()), row.get("grid_limits", ()))):
        if size > limit:
            found.append(f"grid dimension {axis} = {size} > {limit}")
    if "float64" in row["config"] or row["config"].startswith("fp64"):
        narrowed = [name for name, kind in row.get("scalars", {}).items() if kind == "fp32"]
        if narrowed:
            found.append(f"float64 kernel takes float32 scalars {narrowed}")
    return found


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " | problems |", "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [str(row.get(column, "")) for column in COLUMNS]
        cells[3] = cells[3].splitlines()[0][:80] if cells[3] else ""
        lines.append("| " + " | ".join(cells) + " | " + "; ".join(problems(row)).replace("|", "/") + " |")
    return "\n".join(lines) + "\n"


def main(archs: list[int], out: Path, select: str | None = None, cuda_extension: Path | None = None) -> int:
    """Writes ``out``/static.json and static.md; returns 1 when a row breaks a budget.
    ``cuda_extension``: the built ``_cuda`` to read (default: the importable one, if any)."""
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="tensor_peft-triton-cache-"))
    from .cuda_aot import built_extension, resource_rows

    rows = triton_rows(archs, select)
    extension = cuda_extension or built_extension()
    if extension is not None and not select:
        rows += resource_rows(extension, archs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "static.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "static.md").write_text(markdown(rows))
    failing = [row for row in rows if problems(row)]
    cuda_note = f"cuda kernels from {extension}" if extension else "no built _cuda extension: cuda kernels not checked"
    print(f"gpu-report: {len(rows)} rows, {len(failing)} over budget ({cuda_note}); {out / 'static.md'}")
    return 1 if failing else 0
