"""Memory floors of the memory-bound ops and their measured times on the GPU here.

A floor is the bytes an op must move (each input read once, the output written once)
over the memory bandwidth: 3.0 TB/s (H100 SXM) and 4.8 TB/s (H200). ``python -m
tensor_peft.gpu_report.floors`` (run by ``benchmarks/gpu_check.sh``) times each op on
every backend that runs on CUDA tensors (CUDA events, median of 20 after warm-up) and
prints the time against both floors. ``python -m tensor_peft.gpu_report.floors --traffic``
prints, without a GPU, the bytes the Triton SNELL sparsified update moves
(``sparse_delta_bytes``) against the floor, and the bytes each GPU op moves on a bfloat16
model at LLaMA-7B's shapes with and without the op layer's float32 copies
(``half_traffic``); ``--steps`` the modelled H100 time of a whole training step per
method (``step_model``)."""

from __future__ import annotations

import statistics
import sys

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
    W_bf16 = W.bfloat16()  # read and written in its dtype: 2 bytes each way
    yield "tucker_merge 4096x4096 bf16 weight r=8", 2 * W.numel() * 2, lambda: ops.tucker_merge(
        W_bf16, core, [U0, U1], 0.5
    )
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


def sparse_delta_bytes(numel: int, dtype: torch.dtype, candidates: int) -> int:
    """Bytes the Triton ``kernelized_sparse_delta`` moves for ΔW of numel entries when the
    k-th's bin at the compacting pass holds ``candidates`` entries: ΔW written by the κ
    pass, read by every pass up to the compacting one, the candidates written there and
    read by each later pass, and ΔW read and written by the mask. Candidates that
    overflow the buffer: the buffer written full and ΔW read by the next pass, whose
    candidates (a longer prefix) are taken as negligible. ``sparsify`` moves the same (its
    first pass reads x where the κ pass writes ΔW)."""
    from ..backends.triton import select

    passes, compacting = len(select._shifts(dtype)), select._compacting_pass(dtype)
    capacity, later = select._candidate_capacity(numel), passes - 1 - compacting
    entries = numel + compacting * numel + 2 * numel
    if candidates <= capacity:
        entries += candidates * (1 + later)
    elif later:
        entries += capacity + numel
    return entries * dtype.itemsize


def traffic_table() -> str:
    """A markdown table of ``sparse_delta_bytes`` for SNELL's typical shapes: normal-like
    data (the k-th's bin holding 4% of float32 entries, 0.02% of float64 ones) and data
    concentrated in one bin (more than the buffer), against the floor (ΔW written once)."""
    lines = ["| ΔW | dtype | candidates | bytes | × floor | µs at " + " | µs at ".join(BANDWIDTH) + " |",
             "|---|---|---|---|---|" + "---|" * len(BANDWIDTH)]  # fmt: skip
    for m, n in ((768, 3072), (4096, 11008)):
        for dtype, share in ((torch.float32, 0.04), (torch.float64, 0.0002)):
            numel = m * n
            for label, candidates in ((f"{share:.2%}", int(numel * share)), ("overflow", numel)):
                nbytes = sparse_delta_bytes(numel, dtype, candidates)
                times = " | ".join(f"{nbytes / bandwidth * 1e6:.1f}" for bandwidth in BANDWIDTH.values())
                floor = numel * dtype.itemsize
                lines.append(f"| {m}×{n} | {str(dtype).removeprefix('torch.')} | {label} | {nbytes / 1e6:.1f} MB | "
                             f"{nbytes / floor:.2f} | {times} |")  # fmt: skip
    return "\n".join(lines)


LLAMA_7B_SHAPES = {"attention 4096×4096": (4096, 4096), "MLP 4096×11008": (4096, 11008)}
BF16, F32_COMPUTE = 2, 4


def _upcast_extra(reads: int, writes: int) -> int:
    """Bytes per entry the float32 copies add around a kernel that reads ``reads`` and
    writes ``writes`` weight-sized half tensors: each input read in half and written in
    float32 before the kernel, read by the kernel in float32 (2 + 4 + 4 instead of 2), and
    each output written by the kernel in float32, read and written in half (4 + 4 + 2
    instead of 2)."""
    return (reads + writes) * (10 - BF16)


def half_traffic(numel: int) -> list[tuple[str, int, int]]:
    """(op, bytes moved with the float32 copies, bytes with half tensors read and written
    directly) for the GPU ops on weight-sized bfloat16 tensors of ``numel`` entries,
    counting those tensors only (factors, embeddings and statistics are a rank's fraction
    of them). ``tucker_merge`` read and wrote a half weight directly before the op layer
    took half tensors: both counts are direct. SNELL selects τ over κ in the compute dtype
    (float32): ``sparse_delta_bytes`` at float32 with normal-like data (4% of the entries
    in the k-th's bin), its last write in half, or in float32 and then copied (read in
    float32, written in half). That row counts the Triton selection; the cuda kernels'
    radix select reads the float32 κ once per 8-bit digit (four passes, where the Triton
    one reads it once and then its candidates): about 12 bytes an entry more either way. The other rows hold for both backends."""
    select = sparse_delta_bytes(numel, torch.float32, int(numel * 0.04)) - (F32_COMPUTE - BF16) * numel
    ops = [  # (op, weight-sized reads, writes, bytes beyond them, copied before)
        ("tucker_delta forward (FLoRA ΔW)", 0, 1, 0, True),
        ("tucker_delta backward (reads Γ)", 1, 0, 0, True),
        ("tucker_merge forward (W0 + ΔW)", 1, 1, 0, False),
        ("lowrank_hadamard_merge forward (LieRA W0 ⊙ exp ΔW)", 1, 1, 0, True),
        ("lowrank_hadamard_merge backward (reads Γ, W0)", 2, 0, 0, True),
        ("kernelized_sparse_delta forward (SNELL, 90% sparse)", 0, 0, select, True),
        ("kernelized_sparse_delta backward (reads Γ)", 1, 0, 0, True),
        ("sparsify backward (reads Γ, ΔW; writes ∂ΔW)", 2, 1, 0, True),
    ]
    rows = []
    for name, reads, writes, extra, copied_before in ops:
        direct = (reads + writes) * BF16 * numel + extra
        copies = (_upcast_extra(reads, writes) + (2 * F32_COMPUTE if extra else 0)) * numel
        rows.append((name, direct + copies if copied_before else direct, direct))
    return rows


def half_traffic_table() -> str:
    """A markdown table of ``half_traffic`` at LLaMA-7B's projection shapes, with the time
    each takes at H100's 3.0 TB/s, and the GPU backends whose kernels take half tensors
    directly (``backends.kernel_dtypes``); the others pay the copies."""
    from ..backends import registry

    direct = [name for name in ("triton", "cuda") if torch.bfloat16 in registry.kernel_dtypes(name)]
    lines = [f"bfloat16 weights; read and written directly by: {', '.join(direct) or 'none'}", "",
             "| op | shape | MB before (float32 copies) | µs at 3.0 TB/s | MB after (direct) | µs at 3.0 TB/s |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for label, (m, n) in LLAMA_7B_SHAPES.items():
        for name, before, after in half_traffic(m * n):
            lines.append(f"| {name} | {label} | {before / 1e6:.0f} | {before / 3.0e12 * 1e6:.1f} | "
                         f"{after / 1e6:.0f} | {after / 3.0e12 * 1e6:.1f} |")  # fmt: skip
    return "\n".join(lines)


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

    if sys.argv[1:] == ["--traffic"]:
        print(traffic_table(), half_traffic_table(), sep="\n\n")
        return 0
    if sys.argv[1:] == ["--steps"]:
        from .step_model import steps_table

        print(steps_table())
        return 0
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
