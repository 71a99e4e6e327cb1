"""Memory floors of the memory-bound ops and their measured times on the GPU here.

A floor is the bytes an op must move (each input read once, the output written once)
over the memory bandwidth: 3.0 TB/s (H100 SXM) and 4.8 TB/s (H200). ``python -m
tensor_peft.gpu_report.floors`` (run by ``benchmarks/gpu_check.sh``) times each op on
every backend that runs on CUDA tensors (CUDA events, median of 20 after warm-up) and
prints the time against both floors."""

from __future__ import annotations

import statistics

import torch

BANDWIDTH = {"H100 3.0 TB/s": 3.0e12, "H200 4.8 TB/s": 4.8e12}
F32 = 4


def cases(device: torch.device):
    """(name, bytes moved at the floor, call) for float32 at typical sizes."""
    from tensor_peft import ops

    def randn(*shape):
        return torch.randn(shape, device=device)

    W, core, U0, U1 = randn(4096, 4096), randn(8, 8), randn(4096, 8), randn(4096, 8)
    yield "tucker_merge 4096x4096 r=8", 2 * W.numel() * F32, lambda: ops.tucker_merge(W, core, [U0, U1], 0.5)
    yield "tucker_delta 4096x4096 r=8", W.numel() * F32, lambda: ops.tucker_delta(core, [U0, U1], 0.5)
    B, A = randn(4096, 8) * 0.01, randn(8, 4096) * 0.01
    yield "lowrank_hadamard_merge 4096x4096 r=8", 2 * W.numel() * F32, lambda: ops.lowrank_hadamard_merge(
        W, B, A, 0.5
    )
    out_emb, in_emb = randn(2, 4096, 4), randn(2, 11008, 4)
    yield "kernelized_sparse_delta 4096x11008", 4096 * 11008 * F32, lambda: ops.kernelized_sparse_delta(
        out_emb, in_emb, 0.9
    )
    delta = randn(4096, 11008)
    yield "sparsify 4096x11008", 2 * delta.numel() * F32, lambda: ops.sparsify(delta, 0.9)


def median_seconds(call, repeats: int = 20) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> int:
    from tensor_peft import backends

    if not torch.cuda.is_available():
        print("floors: no CUDA GPU here")
        return 2
    device = torch.device("cuda")
    print(f"floors on {torch.cuda.get_device_name()}: measured µs vs floor µs ({', '.join(BANDWIDTH)})")
    for backend in [name for name in backends.available("cuda") if name != "reference"]:
        for name, nbytes, call in cases(device):
            floors = "  ".join(f"{nbytes / bandwidth * 1e6:7.1f}" for bandwidth in BANDWIDTH.values())
            try:
                with backends.use(backend):
                    measured = f"{median_seconds(call) * 1e6:9.1f}"
            except Exception as error:  # printed: the run goes on to the next op
                measured = f"failed ({type(error).__name__}: {str(error)[:80]})"
            print(f"  {backend:7} {name:40} {measured}   floor {floors}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
