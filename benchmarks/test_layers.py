"""A training step (forward + backward) of every adapter layer on two base layers, a ViT-B
MLP Linear (768→3072, 8×197 tokens) and a ResNet-stage Conv2d (64→64, 3×3, batch 16,
28×28), against the frozen base layer's own step (the baseline), peft's nearest method
(LoRA for LoRA/MTLoRA, LoHa / LoKr for FLoRA, HiRA for LieRA's hadamard group, OFT for its
orthogonal group) and the matmul floor: the multiply-adds of the base step's two products
(output and input gradient) at this machine's measured matmul rate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensor_peft as tp

from .conftest import run

LAYERS = {
    "linear": (lambda: nn.Linear(768, 3072), (8 * 197, 768)),
    "conv2d": (lambda: nn.Conv2d(64, 64, 3, padding=1), (16, 64, 28, 28)),
}

OURS = {
    "lora": lambda: tp.LoRAConfig(target_modules=["0"], r=8, alpha=8.0),
    "mtlora-icfm": lambda: tp.MTLoRAConfig(target_modules=["0"], r=8, variant="icfm"),
    "flora-auto": lambda: tp.FLoRAConfig(target_modules=["0"], r=8),
    "liera-exact": lambda: tp.LieRAConfig(target_modules=["0"], r=8),
    "liera-taylor1": lambda: tp.LieRAConfig(target_modules=["0"], r=8, exp="taylor1"),
    "liera-orthogonal": lambda: tp.LieRAConfig(target_modules=["0"], group="orthogonal", block_size=8),
    "snell": lambda: tp.SNELLConfig(target_modules=["0"], r=8, sparsity=0.9),
}


def _peft_configs():
    peft = pytest.importorskip("peft")
    return {
        "peft-lora": lambda: peft.LoraConfig(target_modules=["0"], r=8, lora_alpha=8),
        "peft-loha": lambda: peft.LoHaConfig(target_modules=["0"], r=8, alpha=8, use_effective_conv2d=True),
        "peft-lokr": lambda: peft.LoKrConfig(target_modules=["0"], r=8, alpha=8, use_effective_conv2d=True),
        "peft-hira": lambda: peft.HiraConfig(target_modules=["0"], r=8),
        "peft-oft": lambda: peft.OFTConfig(target_modules=["0"], r=0, oft_block_size=8),
    }


PEFT = ["peft-lora", "peft-loha", "peft-lokr", "peft-hira", "peft-oft"]


def _base_macs(layer: str, shape: tuple[int, ...]) -> int:
    """Multiply-adds of the frozen base layer's step: output and input gradient."""
    if layer == "linear":
        return 2 * shape[0] * 768 * 3072
    batch, channels, height, width = shape
    return 2 * batch * height * width * channels * 64 * 9


@pytest.mark.parametrize("variant", ["base", *OURS, *PEFT])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_adapter_layer_training_step(benchmark, device, floors, layer, variant):
    make_base, shape = LAYERS[layer]
    torch.manual_seed(0)
    model = nn.Sequential(make_base()).to(device)
    if variant in OURS:
        tp.inject(model, OURS[variant]())
    elif variant != "base":
        peft = pytest.importorskip("peft")
        try:
            model = peft.get_peft_model(model, _peft_configs()[variant]())
        except (ValueError, TypeError, NotImplementedError) as error:
            pytest.skip(f"{variant} does not take a {layer}: {error}")
    else:
        model.requires_grad_(False)
    x = torch.randn(shape, device=device, requires_grad=True)

    def step():
        out = model(x)
        out.backward(torch.ones_like(out))

    benchmark.group = f"adapter layer training step, {layer} {tuple(shape)} ({device})"
    floor = _base_macs(layer, shape) / floors["macs_per_s"]
    run(benchmark, step, device, rounds=5, baseline=variant == "base", floor_s=floor)
