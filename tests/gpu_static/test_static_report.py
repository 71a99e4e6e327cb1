"""The ahead-of-time check: ``python -m tensor_peft gpu-report --static`` compiles every
Triton kernel configuration the launchers use for sm_80 and sm_90 (through Triton's launch
binder, in a process with the interpreter off) and reads the built CUDA kernels; every
row must meet its budgets (``tensor_peft.gpu_report.problems``): compiled, compile time ≤
30 s, no spills, shared memory within the limit, grids within CUDA's limits, no float32
scalar into a float64 kernel, no stack frame in the hot CUDA kernels; and the shapes that
specialize the kernels differently are among the op calls. About 10 minutes on two idle
cores (about 450 compiles); marked ``gpu_static`` so that ``-m "not gpu_static"``
leaves it out of a quick run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from tensor_peft.gpu_report import COMPILE_BUDGET_S, problems  # noqa: E402

pytestmark = pytest.mark.gpu_static


@pytest.fixture(scope="module")
def rows(compile_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_report")
    result = subprocess.run([sys.executable, "-m", "tensor_peft", "gpu-report", "--static", "--arch", "80,90",
                             "--out", str(out)], env=compile_env, capture_output=True, text=True)  # fmt: skip
    if not (out / "static.json").exists():
        pytest.fail(f"gpu-report wrote nothing: {result.stderr[-3000:]}")
    return json.loads((out / "static.json").read_text())


def test_every_kernel_family_and_arch_is_covered(rows):
    triton_kernels = {(row["kernel"], row["arch"]) for row in rows if row["config"] != "launcher"}
    for kernel in ("lowrank.merge_kernel", "lowrank.backward_kernel", "expm.expm_kernel", "kernelized.delta_kernel",
                   "kernelized.backward_kernel", "kernelized.columns_kernel", "select.count_kernel",
                   "select.search_kernel", "select.refine_kernel", "select.mask_kernel"):  # fmt: skip
        assert {(kernel, 80), (kernel, 90)} <= triton_kernels, kernel
    from tensor_peft.gpu_report.cuda_aot import built_extension

    if built_extension() is not None:  # the build's CUDA kernels, for both archs
        assert {row["arch"] for row in rows if ".cu " in row["kernel"] and row["status"] == "ok"} == {80, 90}


def test_every_row_meets_its_budgets(rows):
    failing = {f"{row['kernel']} [{row['config']}] sm_{row['arch']}": problems(row) for row in rows if problems(row)}
    assert not failing, json.dumps(failing, indent=1)


def test_compile_times_are_measured_and_within_budget(rows):
    times = [row["compile_s"] for row in rows if "compile_s" in row]
    assert times and max(times) <= COMPILE_BUDGET_S


def test_float64_kernels_take_float64_scalars(rows):
    float64 = [row for row in rows if row["config"].startswith("fp64")]
    assert float64
    for row in float64:
        assert "fp32" not in row["scalars"].values(), (row["kernel"], row["config"], row["scalars"])


def test_the_configurations_that_specialize_differently_are_covered(rows):
    """Launched by some op call, each compiled (a row of its own, or a row it shares)."""
    used_by = " | ".join(label for row in rows for label in row.get("used_by", ()))
    for configuration in ("float16 weight linear", "bfloat16 weight linear", "linear 4096x4096 r=1 ",
                          "linear 768x50257", "linear 65536x65536", "matrix_exp_backward n=1 ",
                          "batch=2097153", "chunks=1 width=8", "chunks=8 width=1", "chunks=2 width=32",
                          "768x50257 chunks=2 width=4", "sparsify hard 50000x50000"):  # fmt: skip
        assert configuration in used_by, configuration
    configs = {(row["kernel"], row["config"]) for row in rows if row["config"] != "launcher"}
    assert any(kernel == "kernelized.backward_kernel" and "BP=32" in config for kernel, config in configs)
    assert any(kernel == "lowrank.merge_kernel" and "fp16" in config.split()[0] for kernel, config in configs)
    for kernel in ("select.count_kernel", "select.refine_kernel", "select.mask_kernel"):
        assert any(k == kernel and "int64:count" in config for k, config in configs), kernel
