"""A FLoRA Conv2d training step (forward + backward; batch 16, 64→64 channels, 3×3,
56×56, ranks [16, 16, 2, 2]) against the frozen base conv's own step, the upstream way
(dense ΔW built every step, a second conv), and peft's LoRA (r=8) and LoHa with
``use_effective_conv2d`` on the same layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensor_peft as tp

from .conftest import run


def _layer_and_input(device):
    torch.manual_seed(0)
    base = nn.Conv2d(64, 64, 3, padding=1).to(device).requires_grad_(False)
    x = torch.randn(16, 64, 56, 56, device=device, requires_grad=True)
    return base, x


def _peft_layer(base, config):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(nn.Sequential(base), config)
    return model


def _upstream(base):
    """The upstream FLoRA layer's way: the dense ΔW by mode products, then a second conv."""
    core = nn.Parameter(torch.zeros(16, 16, 2, 2, device=base.weight.device))
    factors = [nn.Parameter(torch.randn(d, r, device=base.weight.device)) for d, r in zip((64, 64, 3, 3), (16, 16, 2, 2))]

    def forward(x):
        delta = torch.einsum("abcd,ia,jb,kc,ld->ijkl", core, *factors)
        return base(x) + F.conv2d(x, delta, padding=1)

    return forward


VARIANTS = ["base", "flora-auto", "flora-merged", "flora-factorized", "upstream", "peft-lora-r8", "peft-loha-effective"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_flora_conv2d_training_step(benchmark, device, variant):
    base, x = _layer_and_input(device)
    if variant == "base":
        layer = base
    elif variant.startswith("flora-"):
        layer = tp.nn.FLoRALayer(base, ranks=[16, 16, 2, 2], execution=variant.split("-")[1])
    elif variant == "upstream":
        layer = _upstream(base)
    elif variant == "peft-lora-r8":
        layer = _peft_layer(base, pytest.importorskip("peft").LoraConfig(target_modules=["0"], r=8, lora_alpha=8))
    else:
        peft = pytest.importorskip("peft")
        layer = _peft_layer(base, peft.LoHaConfig(target_modules=["0"], r=8, alpha=8, use_effective_conv2d=True))

    def step():
        out = layer(x)
        out.backward(torch.ones_like(out))

    benchmark.group = f"FLoRA Conv2d training step ({device})"
    extra = {"baseline": variant == "base"}
    if isinstance(layer, tp.nn.FLoRALayer):
        step()
        extra["execution"] = layer.last_execution
    run(benchmark, step, device, rounds=5, **extra)
