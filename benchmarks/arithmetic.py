"""What the floor of ``test_real_shapes`` leaves out for LieRA, SNELL and SNELLA: the
arithmetic of their elementwise update over the m·n weight, which a step evaluates twice
(forward, and again in backward: nothing m·n is kept between them).

One evaluation (LieRA's W0 ⊙ exp(s·B·A) by ``ops.lowrank_hadamard_merge``; SNELL's and
SNELLA's kernel function κ over all entries by ``ops.kernelized_delta``, no selection) is
timed beside the floor's pieces at 4096×4096 and 512 tokens, rank 8, in the steady state
(after warm-ups: a process's first large fresh tensors come slower). The floor counts the
pass that writes each evaluation's output; the floor with the arithmetic puts the
evaluation in that pass's place:

    floor + 2 · (evaluation − half a copy)

A method can come no nearer its floor than this ratio without evaluating its update once
less, or more cheaply.

    python -m benchmarks.arithmetic [--threads 2] [--name NAME]

writes ``benchmarks/results/arithmetic-<name>.md``."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tensor_peft import ops
from tensor_peft.bench import default_name

from .test_real_shapes import FLOORS, SHAPES, floor_parts

SHAPE = "llama-4096x4096-t512"
EVALUATIONS_PER_STEP = 2


def evaluations(m: int, n: int) -> dict:
    """Each method's evaluation of its update over (m, n), rank 8, as the adapters start
    it but with nonzero factors."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(m, n, generator=generator) * 0.02
    lora_b, lora_a = torch.randn(m, 8, generator=generator) * 0.1, torch.randn(8, n, generator=generator) * 0.1
    out_emb, in_emb = torch.randn(2, m, 4, generator=generator), torch.randn(2, n, 4, generator=generator)
    return {
        "liera": lambda: ops.lowrank_hadamard_merge(weight, lora_b, lora_a, 1.0),
        "snell": lambda: ops.kernelized_delta(out_emb, in_emb, "piecewise_linear"),
        "snella": lambda: ops.kernelized_delta(out_emb, in_emb, "mixture"),
    }


def measure(threads: int, warmups: int = 8, rounds: int = 15) -> dict:
    """Median seconds of the floor's pieces and each evaluation, interleaved round by round."""
    torch.set_num_threads(threads)
    make_base, input_shape, _ = SHAPES[SHAPE]
    x = torch.randn(input_shape, requires_grad=True)
    pieces = {**floor_parts(make_base, x), **evaluations(*make_base().weight.shape)}
    times = {name: [] for name in pieces}
    with torch.no_grad():
        for round_ in range(warmups + rounds):
            for name, piece in pieces.items():
                start = time.perf_counter()
                (torch.enable_grad() if name == "base" else torch.no_grad())(piece)()
                if round_ >= warmups:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def table(medians: dict, threads: int) -> str:
    copy = medians["copy"]
    lines = [
        f"# The arithmetic the floor leaves out ({SHAPE}, {threads} threads)", "",
        f"Base step {medians['base'] * 1e3:.1f} ms, Γ {medians['gamma'] * 1e3:.1f} ms, a copy of W0 "
        f"{copy * 1e3:.1f} ms (two passes).", "",
        "| method | one evaluation ms | floor ms | floor with the arithmetic ms | ratio to the floor |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for method in ("liera", "snell", "snella"):
        needs_gamma, passes = FLOORS[method]
        floor = medians["base"] + needs_gamma * medians["gamma"] + passes / 2 * copy
        with_arithmetic = floor + EVALUATIONS_PER_STEP * (medians[method] - copy / 2)
        lines.append(f"| {method} | {medians[method] * 1e3:.1f} | {floor * 1e3:.1f} | {with_arithmetic * 1e3:.1f} | "
                     f"{with_arithmetic / floor:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    text = table(measure(args.threads), args.threads)
    path = Path("benchmarks/results") / f"arithmetic-{args.name or default_name()}.md"
    path.write_text(text)
    print(text, f"wrote {path}", sep="\n")


if __name__ == "__main__":
    main()
