"""The static report has one row per specialization Triton compiled, not per configuration
name: checked against Triton's own compile cache (the distinct compiled kernels of the
same op call) on a call whose launches specialize differently: float64 sparsify's
compacting radix passes read ``lengths[2:]``, ``lengths[3:]`` and ``lengths[4:]`` (an
int64 pointer 16-byte aligned or not), the last pass has shift 0 (a multiple of 16)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("triton")

LABEL = "sparsify hard 768x3072 float64"
SCRIPT = """
import json, sys
from tensor_peft.gpu_report import triton_rows
from tensor_peft.gpu_report.configs import op_calls
from tensor_peft.gpu_report.triton_aot import compiling_for

label = sys.argv[1]
rows = triton_rows([90], label)
with compiling_for(90) as launches:
    dict(op_calls())[label]()
print(json.dumps({"rows": rows, "compiled": sorted({(l.kernel, l.compiled.hash) for l in launches})}))
"""


@pytest.fixture(scope="module")
def report(compile_env):
    result = subprocess.run([sys.executable, "-c", SCRIPT, LABEL], env=compile_env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_one_row_per_compiled_specialization(report):
    compiled = {}
    for kernel, _ in report["compiled"]:
        compiled[kernel] = compiled.get(kernel, 0) + 1
    rows = {}
    for row in report["rows"]:
        assert row["status"] == "ok", row
        rows[row["kernel"]] = rows.get(row["kernel"], 0) + 1
    assert rows == compiled
    assert compiled["select.refine_kernel"] >= 3 and compiled["select.search_kernel"] >= 2


def test_row_names_say_what_differs(report):
    compacting = [row["config"] for row in report["rows"]
                  if row["kernel"] == "select.refine_kernel" and "COMPACT=True" in row["config"]]  # fmt: skip
    unaligned = [config for config in compacting
                 if any(part.startswith("not÷16:") and "lengths" in part[7:].split(",") for part in config.split())]  # fmt: skip
    assert len(compacting) == 2 and len(unaligned) == 1, compacting
