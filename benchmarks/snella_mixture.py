"""Time of SNELL's fused ops on the cpu backend at a small LLaMA layer (344×128, r = 8 in
2 chunks, 512 tokens, sparsity 0.5): ops.kernelized_sparse_delta and ops.sparse_linear,
forward + backward, for the mixture (SNELLA) and piecewise_linear kernels. Prints the
median of ``--calls`` calls in ms; run with OMP_NUM_THREADS=1 for one thread.

    OMP_NUM_THREADS=1 python benchmarks/snella_mixture.py"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tensor_peft as tp
from tensor_peft import backends
from tensor_peft.ops.kernelized_sparse_delta import sparse_linear

M, N, R, CHUNKS, TOKENS, SPARSITY = 344, 128, 8, 2, 512, 0.5


def inputs(kernel: str):
    torch.manual_seed(0)
    out_emb = (torch.randn(CHUNKS, M, R // CHUNKS) * 0.1).requires_grad_()
    in_emb = (torch.randn(CHUNKS, N, R // CHUNKS) * 0.1).requires_grad_()
    params = {}
    if kernel == "mixture":
        params = {name: torch.tensor(value, requires_grad=True) for name, value in
                  (("alpha", 1.0), ("beta", 0.0), ("gamma", 0.7))}  # fmt: skip
    return out_emb, in_emb, params


def median_ms(step, calls: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=25)
    calls = parser.parse_args().calls
    x, weight = torch.randn(TOKENS, N), torch.randn(M, N)
    for kernel in ("mixture", "piecewise_linear"):
        out_emb, in_emb, params = inputs(kernel)

        def delta_step():
            tp.ops.kernelized_sparse_delta(out_emb, in_emb, SPARSITY, kernel, **params).square().sum().backward()

        def linear_step():
            sparse_linear(x, weight, None, out_emb, in_emb, SPARSITY, kernel, **params).square().sum().backward()

        for name, step in (("kernelized_sparse_delta", delta_step), ("sparse_linear", linear_step)):
            with backends.use("cpu"):
                print(f"{kernel:16s} {name:24s} fwd+bwd {median_ms(step, calls):7.3f} ms", flush=True)


if __name__ == "__main__":
    main()
