"""One adapted layer at the shapes people train: LLaMA-7B's projections (4096×4096,
4096→11008, 11008→4096), ViT-B's MLP (768→3072, 1576 tokens) and ResNet 3×3 convs
(64→64 at batch 16, 56×56; 256→256 at batch 32, 14×14). A step is forward, backward
(the input needing its gradient, as inside a network) and AdamW's step, rank 8.

Every method runs beside peft's LoRA and beside its floor, interleaved round by round in
the same test (``pedantic``'s untimed setup times them), so that a change of load hits
all three alike. The floor is

    base step (the frozen layer's forward and input gradient)
    + Γ = Σ gₜxₜᵀ, the dense weight gradient, for the methods whose update needs it
    + the passes over the m·n weight its math needs, each timed as half a copy of W0

(``FLOORS``: what each method's passes are). Rows: median ms, ×peft LoRA, ×floor.

    python -m tensor_peft bench -k real_shapes --name real-shapes-<host>

Fewer rounds at the big shapes (5 timed rounds after two warm-ups at 4096×4096 and 512
tokens and below, 3 or 2 above) keep the run within 15 minutes on 2 quiet cores. Two
warm-ups, because a process's first large fresh tensors can come several times slower
than later ones (the system's huge pages are found and zeroed at first)."""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensor_peft as tp

from .conftest import synchronize

# name: (make the base layer, input shape, timed rounds)
SHAPES = {
    "llama-4096x4096-t512": (lambda: nn.Linear(4096, 4096), (512, 4096), 5),
    "llama-4096x4096-t2048": (lambda: nn.Linear(4096, 4096), (2048, 4096), 3),
    "llama-4096to11008-t512": (lambda: nn.Linear(4096, 11008), (512, 4096), 3),
    "llama-4096to11008-t2048": (lambda: nn.Linear(4096, 11008), (2048, 4096), 2),
    "llama-11008to4096-t512": (lambda: nn.Linear(11008, 4096), (512, 11008), 3),
    "llama-11008to4096-t2048": (lambda: nn.Linear(11008, 4096), (2048, 11008), 2),
    "vit-b-mlp-768to3072-t1576": (lambda: nn.Linear(768, 3072), (1576, 768), 5),
    "resnet-conv64-b16-56x56": (lambda: nn.Conv2d(64, 64, 3, padding=1), (16, 64, 56, 56), 5),
    "resnet-conv256-b32-14x14": (lambda: nn.Conv2d(256, 256, 3, padding=1), (32, 256, 14, 14), 5),
}

TARGET = ["0"]
OURS = {
    "lora": lambda: tp.LoRAConfig(target_modules=TARGET, r=8, alpha=8.0),
    "mtlora": lambda: tp.MTLoRAConfig(target_modules=TARGET, r=8, variant="icfm"),
    "flora": lambda: tp.FLoRAConfig(target_modules=TARGET, r=8),
    "liera": lambda: tp.LieRAConfig(target_modules=TARGET, r=8),
    "snell": lambda: tp.SNELLConfig(target_modules=TARGET, r=8, sparsity=0.9),
    "snella": lambda: tp.SNELLAConfig(target_modules=TARGET, r=8, init_sparsity=0.9),
}
PEFT = ["peft-lora", "peft-hira", "peft-oft"]
PLAIN = ["flora-plain"]  # FLoRA the plain-torch way on convs: einsum ΔW, one conv with W0 + ΔW

# method: (needs Γ, passes over m·n). LieRA: forward reads W0 and writes W_eff; backward
# reads Γ and W0 and writes W_eff again (nothing m·n kept from the forward): 5. SNELL:
# forward writes ΔW (the selection counts as it goes), reads it and W0 and writes W_eff;
# backward reads Γ and W0 and writes W_eff: 7. SNELLA (mixture): as SNELL, and its column
# softmax reads Γ once more in backward (the column sums of D·S): 8. peft's HiRA (W0 ⊙ BA)
# counted as LieRA; peft's OFT rotates the input (no Γ). FLoRA on a conv runs merged (Γ,
# a conv's weight gradient).
FLOORS = {
    "peft-lora": (False, 0), "lora": (False, 0), "mtlora": (False, 0),
    "liera": (True, 5), "snell": (True, 7), "snella": (True, 8),
    "peft-hira": (True, 5), "peft-oft": (False, 0),
}  # fmt: skip


def floor_of(variant: str, is_conv: bool) -> tuple[bool, int]:
    if variant.startswith("flora"):
        return is_conv, 0
    return FLOORS[variant]


def _peft_config(variant: str):
    peft = pytest.importorskip("peft")
    if variant == "peft-lora":
        return peft.LoraConfig(target_modules=TARGET, r=8, lora_alpha=8)
    if variant == "peft-hira":
        return peft.HiraConfig(target_modules=TARGET, r=8)
    return peft.OFTConfig(target_modules=TARGET, r=0, oft_block_size=8)


def _plain_flora(base: nn.Conv2d) -> nn.Module:
    """FLoRA's conv update the plain-torch way: ΔW by one einsum of the Tucker factors
    (ranks [8, 8, 2, 2]), then one conv with W0 + ΔW."""

    class PlainFLoRA(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base.requires_grad_(False)
            shape = base.weight.shape
            self.core = nn.Parameter(torch.zeros(8, 8, 2, 2))
            self.factors = nn.ParameterList(
                nn.Parameter(torch.randn(size, rank) / math.sqrt(size)) for size, rank in zip(shape, (8, 8, 2, 2))
            )

        def forward(self, x):
            delta = torch.einsum("abcd,ia,jb,kc,ld->ijkl", self.core, *self.factors)
            return self.base._conv_forward(x, self.base.weight + delta, self.base.bias)

    return PlainFLoRA()


def _adapted(variant: str, make_base) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(make_base())
    if variant in OURS:
        tp.inject(model, OURS[variant]())
    elif variant == "flora-plain":
        model = _plain_flora(model[0])
    else:
        peft = pytest.importorskip("peft")
        try:
            model = peft.get_peft_model(model, _peft_config(variant))
        except (ValueError, TypeError, NotImplementedError) as error:
            pytest.skip(f"{variant} does not take this layer: {error}")
    return model


def training_step(model: nn.Module, x: torch.Tensor):
    """forward, backward and AdamW's step of ``model``'s trainable parameters."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def step():
        out = model(x)
        out.backward(torch.ones_like(out))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        x.grad = None

    return step


def floor_parts(make_base, x: torch.Tensor) -> dict:
    """The floor's pieces as steps: the frozen base step, Γ, and a copy of W0 (two passes)."""
    base = make_base().requires_grad_(False)
    weight = base.weight
    out = base(x)
    grad = torch.ones_like(out)
    if isinstance(base, nn.Conv2d):

        def gamma():
            torch.nn.grad.conv2d_weight(x, weight.shape, grad, base.stride, base.padding)
    else:
        tokens_x, tokens_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])

        def gamma():
            tokens_grad.T @ tokens_x

    def base_step():
        y = base(x)
        y.backward(grad)
        x.grad = None

    target = torch.empty_like(weight)
    return {"base": base_step, "gamma": gamma, "copy": lambda: target.copy_(weight)}


@pytest.mark.parametrize("variant", [*PEFT[:1], *OURS, *PLAIN, *PEFT[1:]])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_real_shape_training_step(benchmark, device, shape, variant):
    make_base, input_shape, rounds = SHAPES[shape]
    is_conv = len(input_shape) == 4
    if variant == "flora-plain" and not is_conv:
        pytest.skip("the plain-torch FLoRA way is compared on convs")
    x = torch.randn(input_shape, device=device, requires_grad=True)
    step = training_step(_adapted(variant, make_base).to(device), x)
    beside = {"peft-lora": training_step(_adapted("peft-lora", make_base).to(device), x), **floor_parts(make_base, x)}
    times = {name: [] for name in beside}

    def setup():  # the steps beside, timed here, one round each before every round of `step`
        for name, other in beside.items():
            synchronize(device)
            start = time.perf_counter()
            other()
            synchronize(device)
            times[name].append(time.perf_counter() - start)

    def body():
        step()
        synchronize(device)

    benchmark.group = f"real shapes: {shape} ({device})"
    benchmark.pedantic(body, setup=setup, rounds=rounds, iterations=1, warmup_rounds=2)
    medians = {name: statistics.median(seconds[-rounds:]) for name, seconds in times.items()}
    needs_gamma, passes = floor_of(variant, is_conv)
    floor = medians["base"] + needs_gamma * medians["gamma"] + passes / 2 * medians["copy"]
    benchmark.extra_info.update(
        method=variant, baseline_s=medians["peft-lora"], floor_s=floor, base_s=medians["base"],
        gamma_s=medians["gamma"] if needs_gamma else 0.0, passes=passes, copy_s=medians["copy"],
    )  # fmt: skip
