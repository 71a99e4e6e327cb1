"""The GPU picture on paper: bytes moved and flops of one training step of one adapted
linear layer per method, bfloat16 weights and activations, counted kernel by kernel from
the passes the ops make today, and the time they imply on an H100 (each kernel takes the
longer of its bytes at 3.35 TB/s and its flops at 990 TFLOP/s on the tensor cores, or
67 TFLOP/s for elementwise float32 work such as SNELL's κ). ``python -m
tensor_peft.gpu_report.floors --steps`` prints the table and the two fusions with the
largest modelled gain.

Counted per kernel: every weight-sized (m·n) tensor read or written once, in its dtype
(bfloat16 W0, W_eff and LieRA's Γ: 2 bytes an entry; SNELL's float32 ΔW, Γ and mixture
buffers: 4; its selection of τ as ``floors.sparse_delta_bytes`` counts the Triton kernel's),
and the activations (tokens × m or n, bfloat16) each matrix product and each LoRA-style
side path reads and writes. Factors, embeddings and statistics (a rank's fraction of a
weight) are left out. A step: forward, backward with the input's gradient (as inside a
network); the optimizer's step touches only the adapter and is left out."""

from __future__ import annotations

from dataclasses import dataclass

import torch

HBM_BYTES_PER_S = 3.35e12
TENSOR_FLOPS = 990e12  # dense bfloat16
VECTOR_FLOPS = 67e12  # float32 on the CUDA cores
HALF, FLOAT = 2, 4
RANK = 8
KAPPA_FLOPS = {"piecewise_linear": 30, "mixture": 45}  # per entry: H=2 chunks of 4, a root each (+ softmax)


@dataclass(frozen=True)
class Kernel:
    name: str
    bytes: int
    flops: int = 0
    tensor_cores: bool = True

    def seconds(self) -> float:
        rate = TENSOR_FLOPS if self.tensor_cores else VECTOR_FLOPS
        return max(self.bytes / HBM_BYTES_PER_S, self.flops / rate)


def _matmuls(m: int, n: int, tokens: int, gamma_bytes: int = 0) -> list[Kernel]:
    """The base layer's forward and input-gradient products (reading W or W_eff in
    bfloat16), and Γ = gᵀx written with ``gamma_bytes`` an entry (0: not formed)."""
    flops = 2 * tokens * m * n
    kernels = [
        Kernel("forward GEMM x·Wᵀ", HALF * (tokens * n + m * n + tokens * m), flops),
        Kernel("input-gradient GEMM g·W", HALF * (tokens * m + m * n + tokens * n), flops),
    ]
    if gamma_bytes:
        kernels.append(Kernel("Γ GEMM gᵀ·x (written)", HALF * (tokens * m + tokens * n) + gamma_bytes * m * n, flops))
    return kernels


def _low_rank_side(m: int, n: int, tokens: int) -> list[Kernel]:
    """LoRA's side path: x·Aᵀ (reads x), ·Bᵀ and the add into y (writes Δy, reads y and Δy,
    writes y); backward: g·B (reads g), ∂A (reads x), ·A and the add into ∂x (writes, reads
    twice, writes)."""
    flops = 6 * tokens * RANK * (m + n)
    forward = HALF * (tokens * n + 4 * tokens * m)
    backward = HALF * (tokens * m + tokens * n + 4 * tokens * n)
    return [Kernel("low-rank side path (forward, backward)", forward + backward, flops)]


def step_kernels(method: str, m: int, n: int, tokens: int, fused: frozenset[str] = frozenset()) -> list[Kernel]:
    """The kernels of one training step of ``method`` on an m×n bfloat16 linear layer,
    with the ``fused`` fusions of ``FUSIONS`` applied."""
    weight = m * n
    if method in ("lora", "mtlora", "flora"):
        return _matmuls(m, n, tokens) + _low_rank_side(m, n, tokens)
    in_tiles, epilogue = "weight-in-tiles" in fused, "gamma-epilogue" in fused
    if method == "liera":  # ops.hadamard_linear
        kernels = _matmuls(m, n, tokens, 0 if epilogue else HALF)
        if not in_tiles:  # W_eff = W0 ⊙ exp(s·BA) written, forward and again in backward for ∂x
            kernels += [Kernel("merge W0 ⊙ exp(BA) (forward)", 2 * HALF * weight),
                        Kernel("merge again (backward, for ∂x)", 2 * HALF * weight)]  # fmt: skip
        if not epilogue:  # ∂B, ∂A from Γ ⊙ W_eff: reads Γ and W0
            kernels.append(Kernel("merge backward (reads Γ, W0)", 2 * HALF * weight, 4 * RANK * weight, False))
        return kernels
    if method in ("snell", "snella"):  # ops.sparse_linear: ΔW, Γ and W0 + ΔW in float32
        from .floors import sparse_delta_bytes

        kernel = "piecewise_linear" if method == "snell" else "mixture"
        kappa = KAPPA_FLOPS[kernel] * weight
        held = 0 if kernel == "piecewise_linear" else 3 * FLOAT * weight  # mixture's P and E: written, read back
        select = sparse_delta_bytes(weight, torch.float32, int(weight * 0.04))  # 4% of ΔW in the k-th's bin
        kernels = _matmuls(m, n, tokens, 0 if epilogue else FLOAT)
        kernels.append(Kernel(f"κ ({kernel}), τ and the mask (forward)", held + select, kappa, False))
        if not in_tiles:  # W0 + ΔW into ΔW's float32 buffer (reads both, writes), then to bfloat16
            merge = (2 * FLOAT + HALF + FLOAT + HALF) * weight
            kernels += [Kernel("W_eff = W0 + ΔW, to bfloat16 (forward)", merge),
                        Kernel("κ again, masked by τ (backward)", held + FLOAT * weight, kappa, False),
                        Kernel("W_eff = W0 + ΔW, to bfloat16 (backward)", merge)]  # fmt: skip
        else:  # κ again inside the input-gradient GEMM's tiles of W0, masked by τ
            kernels.append(Kernel("κ in the input-gradient GEMM's tiles", 0, kappa, False))
        if not epilogue:  # the embeddings' gradients read Γ (mixture: twice, the column sums first)
            reads = 1 if kernel == "piecewise_linear" else 2
            kernels.append(Kernel("kernelized backward (reads Γ)", reads * FLOAT * weight + held, 2 * kappa, False))
        else:
            kernels.append(Kernel("κ's gradients in the Γ GEMM's epilogue", held, 2 * kappa, False))
        return kernels
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


METHODS = ("lora", "mtlora", "flora", "liera", "snell", "snella")
FUSIONS = {
    "weight-in-tiles": "W_eff (W0 ⊙ exp(BA), W0 + sparsified κ) made inside the GEMMs' weight tiles from W0 "
                       "and the factors, never materialized",
    "gamma-epilogue": "Γ reduced into the factors' gradients in the Γ GEMM's epilogue (times W_eff or the mask), "
                      "never written",
}  # fmt: skip


def step_seconds(method: str, m: int, n: int, tokens: int, fused: frozenset[str] = frozenset()) -> float:
    return sum(kernel.seconds() for kernel in step_kernels(method, m, n, tokens, fused))


def largest_fusions(m: int, n: int, tokens: int) -> list[tuple[str, str, float, float]]:
    """(fusion, method, modelled step seconds before, after) of each fusion on the method
    it helps most, largest gain first."""
    best = []
    for fusion in FUSIONS:
        gains = [(step_seconds(method, m, n, tokens) - step_seconds(method, m, n, tokens, frozenset({fusion})), method)
                 for method in METHODS]  # fmt: skip
        _, method = max(gains)
        best.append((fusion, method, step_seconds(method, m, n, tokens),
                     step_seconds(method, m, n, tokens, frozenset({fusion}))))  # fmt: skip
    return sorted(best, key=lambda row: row[3] - row[2])


SHAPES = {"4096×4096": (4096, 4096), "4096→11008": (11008, 4096), "11008→4096": (4096, 11008)}


def steps_table() -> str:
    """Markdown: per shape, tokens and method, the step's bytes, flops, implied H100 time and
    its ratio to LoRA's; then the two fusions with the largest modelled gain."""
    lines = [f"bfloat16, rank {RANK}, one adapted linear layer's training step, at {HBM_BYTES_PER_S / 1e12:.2f} TB/s "
             f"and {TENSOR_FLOPS / 1e12:.0f} TFLOP/s ({VECTOR_FLOPS / 1e12:.0f} TFLOP/s float32 elementwise)", "",
             "| shape (in→out) | tokens | method | MB moved | GFLOP | µs (H100) | × LoRA |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, (m, n) in SHAPES.items():
        for tokens in (512, 2048):
            lora = step_seconds("lora", m, n, tokens)
            for method in METHODS:
                kernels = step_kernels(method, m, n, tokens)
                seconds = sum(kernel.seconds() for kernel in kernels)
                moved, flops = sum(k.bytes for k in kernels), sum(k.flops for k in kernels)
                lines.append(f"| {label} | {tokens} | {method} | {moved / 1e6:.0f} | {flops / 1e9:.1f} | "
                             f"{seconds * 1e6:.1f} | {seconds / lora:.2f} |")  # fmt: skip
    lines += ["", "Fusions with the largest modelled gain (4096×4096, 512 tokens):", ""]
    for fusion, method, before, after in largest_fusions(4096, 4096, 512):
        helped = [f"{other} {step_seconds(other, 4096, 4096, 512) * 1e6:.1f} → "
                  f"{step_seconds(other, 4096, 4096, 512, frozenset({fusion})) * 1e6:.1f} µs"
                  for other in ("liera", "snell", "snella")]  # fmt: skip
        lines.append(f"- **{fusion}** ({FUSIONS[fusion]}): largest gain on {method}, "
                     f"{(before - after) * 1e6:.1f} µs; {', '.join(helped)} (LoRA "
                     f"{step_seconds('lora', 4096, 4096, 512) * 1e6:.1f} µs)")  # fmt: skip
    return "\n".join(lines)
