"""Peak memory and time of a training step through 12 ViT-B-sized MLP blocks (768→3072→768,
8×197 tokens, residual) with SNELL (q=8, s=0.9) against LoRA (r=8) and the naive autograd
SNELL (dense ΔW and mask kept for backward, as the released code does); and one SNELL
step of a 4096×11008 layer (LLaMA-7B's MLP size).

Peak memory is measured in a fresh process per variant: on CUDA by the allocator's peak,
on CPU by the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the
resident set before the step, with glibc's mmap threshold pinned so that freed buffers
go back to the system at once. It is recorded as ``peak_mib`` in the results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensor_peft as tp

from . import memory
from .conftest import run

TOKENS, WIDTH, HIDDEN, BLOCKS = 8 * 197, 768, 3072, 12
VARIANTS = ["lora", "snell", "naive-snell"]


class NaiveSNELL(nn.Module):
    """SNELL by plain autograd: the piecewise-linear ΔW_raw, its k-th smallest magnitude by
    ``kthvalue``, and the masked update, all of which autograd keeps for backward."""

    def __init__(self, base: nn.Linear, r: int = 8, sparsity: float = 0.9):
        super().__init__()
        self.base = base.requires_grad_(False)
        rows, columns = base.weight.shape
        self.out_emb = nn.Parameter(torch.empty(2, rows, r // 2, device=base.weight.device))
        self.in_emb = nn.Parameter(torch.empty(2, columns, r // 2, device=base.weight.device))
        for embedding in (self.out_emb, self.in_emb):
            nn.init.kaiming_uniform_(embedding, a=math.sqrt(5))
        self.dropped = math.ceil(sparsity * rows * columns)

    def forward(self, x):
        raw = 0.1 * torch.cdist(self.out_emb[0], self.in_emb[0]) - 0.1 * torch.cdist(self.out_emb[1], self.in_emb[1])
        tau = raw.detach().abs().flatten().kthvalue(self.dropped).values
        delta = raw * raw.detach().abs() * (raw.abs() > tau)
        return F.linear(x, self.base.weight + delta, self.base.bias)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


def build(variant: str, device: str, shape: tuple[int, int] | None = None):
    """The model for ``variant`` and an input: 12 MLP blocks, or one Linear of ``shape``."""
    torch.manual_seed(0)
    if shape is None:
        model, x = nn.Sequential(*[Block() for _ in range(BLOCKS)]), torch.randn(TOKENS, WIDTH)
    else:
        model, x = nn.Sequential(nn.Linear(shape[1], shape[0])), torch.randn(16, shape[1])
    model = model.to(device)
    if variant == "lora":
        tp.inject(model, tp.LoRAConfig(target_modules=[nn.Linear], r=8, alpha=8.0))
    elif variant == "snell":
        tp.inject(model, tp.SNELLConfig(target_modules=[nn.Linear], r=8, sparsity=0.9))
    else:
        model.requires_grad_(False)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, NaiveSNELL(module))
    return model, x.to(device).requires_grad_()


def training_step(model, x) -> None:
    model(x).square().mean().backward()


def peak_step_mib(variant: str, device: str, shape: tuple[int, int] | None = None) -> float:
    """Memory a training step needs above what the model and input already hold (MiB)."""
    model, x = build(variant, device, shape)
    training_step(model, x)  # warm-up: lazy initializations, thread pools
    model.zero_grad(set_to_none=True)
    x.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        training_step(model, x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    return memory.peak_growth_mib(lambda: training_step(model, x))


def measure_in_fresh_process(variant: str, device: str, shape: tuple[int, int] | None = None) -> float:
    root = Path(__file__).resolve().parents[1]
    code = (
        "import json, sys; from benchmarks.test_snell_memory import peak_step_mib; "
        "print(json.dumps(peak_step_mib(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))))"
    )
    env = {**os.environ, **memory.MMAP_THRESHOLD_ENV}
    result = subprocess.run(
        [sys.executable, "-c", code, variant, device, json.dumps(shape)],
        cwd=root, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_vit_mlp_blocks_training_step(benchmark, device, variant):
    if device == "cpu" and not memory.available():
        pytest.skip("peak memory on CPU is read from Linux's /proc")
    peak = measure_in_fresh_process(variant, device)
    model, x = build(variant, device)
    benchmark.group = f"12 ViT-B MLP blocks, training step ({device})"
    run(benchmark, lambda: training_step(model, x), device, rounds=5, baseline=variant == "lora",
        peak_mib=round(peak, 1))  # fmt: skip


def test_llama_sized_snell_layer_training_step(benchmark, device):
    shape = (4096, 11008)
    peak = measure_in_fresh_process("snell", device, shape)
    model, x = build("snell", device, shape)
    benchmark.group = f"SNELL 4096x11008 layer, training step ({device})"
    run(benchmark, lambda: training_step(model, x), device, rounds=3, peak_mib=round(peak, 1))
