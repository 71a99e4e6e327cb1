"""``python -m tensor_peft info``, ``bench`` outside a source checkout, and the import guarantees."""

from __future__ import annotations

import subprocess
import sys

from tensor_peft.__main__ import main
from tensor_peft.backends import registry


def _python(code_or_args: list[str]) -> str:
    result = subprocess.run(
        [sys.executable, *code_or_args], capture_output=True, text=True, check=True, timeout=120
    )
    return result.stdout


def test_info_lists_every_backend_with_a_verdict_per_device():
    out = _python(["-m", "tensor_peft", "info"])
    assert out.startswith("tensor_peft ")
    for name in registry.NAMES:
        assert f"\n  {name} " in out
    reference_line = next(line for line in out.splitlines() if line.startswith("  reference "))
    for op in ("tucker_delta", "tucker_merge", "matrix_exp", "sparsify", "kernelized_sparse_delta",
               "lowrank_hadamard_merge"):
        assert op in reference_line
    assert out.count("    cpu ") == len(registry.NAMES)
    assert out.count("    cuda ") == len(registry.NAMES)
    for extension in ("_C", "_cuda", "_cuda_emulated"):
        assert f"\n  {extension} " in out


def test_import_and_cpu_ops_do_not_initialize_cuda():
    out = _python([
        "-c",
        "import torch, tensor_peft\n"
        "tensor_peft.ops.matrix_exp(torch.eye(3))\n"
        "print(torch.cuda.is_initialized())",
    ])  # fmt: skip
    assert out.strip() == "False"


def test_bench_outside_a_source_checkout_says_it_needs_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no benchmarks/ here, as for an installed package
    assert main(["bench"]) == 2
    error = capsys.readouterr().err
    assert "needs a source checkout" in error and str(tmp_path / "benchmarks") in error
    assert not (tmp_path / "benchmarks").exists()


def test_bench_table_takes_the_baseline_timed_beside_a_benchmark_and_shows_seconds_in_ms():
    """A benchmark with ``baseline_s`` (its baseline timed beside it) gets its ratio from
    that, not from the group's baseline benchmark; ``*_s`` notes read in ms."""
    from tensor_peft.bench import markdown

    def bench(name, median, **extra):
        return {"name": name, "group": "g", "stats": {"median": median}, "extra_info": extra}

    results = {"machine_info": {"node": "n"}, "datetime": "d", "benchmarks": [
        bench("base", 0.1, baseline=True), bench("beside", 0.3, baseline_s=0.2, floor_s=0.25, base_s=0.0125, passes=5),
        bench("grouped", 0.2),
    ]}  # fmt: skip
    rows = {line.split(" | ")[0].strip("| "): line for line in markdown(results).splitlines() if line.startswith("| ")}
    assert rows["beside"] == "| beside | 300.000 | 1.50x | 250.000 | 1.20x | base=12.5ms, passes=5 |"
    assert rows["grouped"].startswith("| grouped | 200.000 | 2.00x | - | - |")
