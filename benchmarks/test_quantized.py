"""Every method over a 4-bit base (bitsandbytes nf4 with double quantization, as QLoRA
loads a model) against peft's QLoRA (peft's LoRA over the same ``Linear4bit`` layers):
peak memory and time of a training step (forward, backward, AdamW step; SNELLA's
allocator step too) on LLaMA-tiny (width 128, 4 layers, 8 × 64 tokens) and a wider LLaMA
(width 1024, 4 layers, 1 × 512 tokens). Rank 8 everywhere, every projection adapted.
Goal: every method's peak within 5% of QLoRA's; LoRA, MTLoRA and FLoRA steps within 1.1×.

``interleaved_step_vs_qlora`` is the step time's ratio to QLoRA's with the method's and
QLoRA's steps run in turn in one process, which a change of load on a shared machine hits
alike (the median ms column times each method on its own). The peak (``peak_mib``, and
``peak_vs_qlora`` against peft's) is the adapter state
(trainable parameters and AdamW's state) plus the peak of one training step above what
the process held before it, in a fresh process per method (``benchmarks.real_models``'
measure: on CUDA the allocator's peak, on CPU the peak resident set). On CUDA the model
is bfloat16 and computes in bfloat16; on CPU float32.

Run: ``python -m tensor_peft bench -k test_quantized --name quantized`` (on a shared machine
with ``OMP_NUM_THREADS=1``), which writes ``benchmarks/results/quantized.{json,md}``."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tensor_peft as tp

from . import memory
from .conftest import interleaved_medians, run
from .real_models import OURS, TARGET_REGEX, Setup

CONFIGS = {
    "llama-tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, batch=8,
                       tokens=64),
    "llama-1024": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=16, batch=1,
                       tokens=512),
}  # fmt: skip
BASELINE = "peft-qlora"
METHODS = [BASELINE, *OURS]


def quantized_llama(config_name: str, device: str):
    """A random-init LLaMA whose projections are nf4 ``Linear4bit`` layers, and its batch."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    options = dict(CONFIGS[config_name])
    batch, tokens = options.pop("batch"), options.pop("tokens")
    config = LlamaConfig(**options, num_key_value_heads=options["num_attention_heads"], vocab_size=1000,
                         max_position_embeddings=tokens)  # fmt: skip
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(dtype)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      quant_type="nf4", compress_statistics=True, compute_dtype=dtype)  # fmt: skip
            layer.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to(device))
    model.is_loaded_in_4bit = True  # peft then wraps the projections in its bitsandbytes LoRA layers
    ids = torch.randint(0, config.vocab_size, (batch, tokens))
    return model.to(device).train(), {"input_ids": ids.to(device), "labels": ids.to(device)}


def build(config_name: str, method: str, device: str) -> Setup:
    model, batch = quantized_llama(config_name, device)
    after_optimizer = []
    if method == BASELINE:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(target_modules=TARGET_REGEX, r=8, lora_alpha=8))
    else:
        tp.inject(model, OURS[method]())
        if method == "snella":
            after_optimizer.append(tp.SparsityAllocator(model).step)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return Setup(model, batch, optimizer, after_optimizer)


def peak_mib(config_name: str, method: str, device: str) -> float:
    """The peak of ``memory_of`` for this model and method, in a fresh process."""
    code = (
        "import json, sys; from benchmarks.real_models import memory_of; from benchmarks.test_quantized import build; "
        "print(json.dumps(memory_of(*sys.argv[1:4], build_setup=build)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, config_name, method, device], cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, **memory.MMAP_THRESHOLD_ENV}, capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode:
        raise RuntimeError(f"memory of {config_name}/{method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


@functools.cache
def qlora_peak_mib(config_name: str, device: str) -> float:
    return peak_mib(config_name, BASELINE, device)


def interleaved_step_ratio(config_name: str, method: str, device: str) -> float:
    """The method's step time over QLoRA's, from the medians of their steps run in turn in
    one process (a change of load on the machine hits both alike)."""
    if method == BASELINE:
        return 1.0
    setups = {name: build(config_name, name, device) for name in (BASELINE, method)}
    medians = interleaved_medians({name: setup.step for name, setup in setups.items()}, device, repeats=7)
    return medians[method] / medians[BASELINE]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_training_step_over_a_4bit_base(benchmark, device, config_name, method):
    if device == "cpu" and not memory.available():
        pytest.skip("peak memory on CPU is read from Linux's /proc")
    peak = peak_mib(config_name, method, device) if method != BASELINE else qlora_peak_mib(config_name, device)
    setup = build(config_name, method, device)
    benchmark.group = f"{config_name} over nf4, training step ({device})"
    run(benchmark, setup.step, device, rounds=5, baseline=method == BASELINE, peak_mib=round(peak, 1),
        peak_vs_qlora=round(peak / qlora_peak_mib(config_name, device), 3),
        interleaved_step_vs_qlora=round(interleaved_step_ratio(config_name, method, device), 3))  # fmt: skip
