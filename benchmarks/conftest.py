"""Shared fixtures of the benchmark suites: the machine's physical floors, measured in
the same run as the benchmarks (copy bandwidth and matmul rate), and a timing helper.

Run: ``pytest benchmarks/ --benchmark-only`` or ``python -m tensor_peft bench``."""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: str = "cpu", repeats: int = 9) -> float:
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(steps: dict, device: str = "cpu", repeats: int = 7, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each of ``steps`` (name: callable), run in turn ``repeats`` times
    after ``warmup`` rounds, so that a change of load on the machine hits them alike."""
    times = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


MEASURED_FLOORS: dict[str, float] = {}  # written into the results JSON as "floors"


@pytest.fixture(scope="session")
def floors(device) -> dict[str, float]:
    """Copy bandwidth (bytes/s, one read + one write counted) of a 256 MiB buffer, and
    the float32 matmul rate (multiply-adds/s) of 2048² matrices."""
    buffer = torch.empty(64 * 2**20, device=device)
    copy_s = median_seconds(lambda: buffer.clone(), device, repeats=5)
    a = torch.randn(2048, 2048, device=device)
    matmul_s = median_seconds(lambda: a @ a, device, repeats=5)
    MEASURED_FLOORS.update(copy_bytes_per_s=2 * buffer.numel() * 4 / copy_s, macs_per_s=2048**3 / matmul_s)
    return dict(MEASURED_FLOORS)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["floors"] = MEASURED_FLOORS


def run(benchmark, fn, device: str, rounds: int = 7, **extra) -> None:
    """Benchmark ``fn`` (GPU bodies synchronize) and record ``extra`` in the results."""

    def body():
        fn()
        synchronize(device)

    benchmark.extra_info.update(extra)
    benchmark.pedantic(body, rounds=rounds, iterations=1, warmup_rounds=1)
