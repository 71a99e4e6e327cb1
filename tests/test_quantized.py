"""Every method over a quantized base, as QLoRA users fine-tune: a tiny LLaMA whose
projections are bitsandbytes ``Linear4bit`` (nf4/fp4, with and without double
quantization) or ``Linear8bitLt``, or torchao int8 weight-only weights (torchao's int4
weight-only needs a GPU kernel library: not tested here).

The reference is the same model with its projections replaced by ``nn.Linear`` layers
holding the weights dequantized by the library (the "twin"): an adapter over the quantized
base must compute what it computes over the twin, and a merge must hold what quantizing
the twin's merged weight with the library gives."""

from __future__ import annotations

import copy
import gc
import importlib
import pathlib
import re
import subprocess
import sys
import warnings
import weakref

import bitsandbytes as bnb
import peft
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, quantize_
from torchao.quantization.granularity import PerGroup, PerRow, PerTensor

import tensor_peft as tp
from tensor_peft import quantized
from tensor_peft.quantized import RequantizationWarning

import transformers

from .test_real_models import VOCAB, batch, logits, randomize_adapters

BNB_4BIT = {"nf4": ("nf4", False), "nf4-double": ("nf4", True), "fp4": ("fp4", False), "fp4-double": ("fp4", True)}
KINDS = [*BNB_4BIT, "int8", "torchao-int8"]
QUANTIZED_TYPES = {**dict.fromkeys(BNB_4BIT, bnb.nn.Linear4bit), "int8": bnb.nn.Linear8bitLt, "torchao-int8": nn.Linear}

METHODS = {
    "lora": lambda targets: tp.LoRAConfig(target_modules=targets, r=4, alpha=8),
    "mtlora": lambda targets: tp.MTLoRAConfig(target_modules=targets, r=4, variant="icfm"),
    "flora": lambda targets: tp.FLoRAConfig(target_modules=targets, r=4),
    "liera": lambda targets: tp.LieRAConfig(target_modules=targets, r=4),
    "snell": lambda targets: tp.SNELLConfig(target_modules=targets, r=4, sparsity=0.5),
    "snella": lambda targets: tp.SNELLAConfig(target_modules=targets, r=4),
}
NEVER_DEQUANTIZE = ["lora", "mtlora", "flora", "snell", "snella"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: bitsandbytes' CPU kernels on these tiny weights take ~100× longer
    when their OpenMP threads compete for a busy machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def is_projection(name: str, module: nn.Module) -> bool:
    return type(module) is nn.Linear and ".layers." in name


def quantize_linear(linear: nn.Linear, kind: str) -> nn.Module:
    """``linear`` quantized by bitsandbytes, as users load one (state dict, then to device)."""
    shape = (linear.in_features, linear.out_features)
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(*shape, bias=linear.bias is not None, has_fp16_weights=False)
    else:
        quant_type, double = BNB_4BIT[kind]
        layer = bnb.nn.Linear4bit(*shape, bias=linear.bias is not None, quant_type=quant_type,
                                  compress_statistics=double, compute_dtype=torch.float32)  # fmt: skip
    layer.load_state_dict(linear.state_dict())
    return layer.to(linear.weight.device)


def quantize_model(model: nn.Module, kind: str) -> nn.Module:
    if kind == "torchao-int8":
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: is_projection(name, module))
        return model
    for name, module in list(model.named_modules()):
        if is_projection(name, module):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize_linear(module, kind))
    return model


def llama() -> nn.Module:
    """A tiny LLaMA whose projections take at least 64 inputs (bitsandbytes' CPU kernels
    need whole 4-bit blocks)."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def full_precision(seed: int = 0) -> nn.Module:
    """The model ``build`` quantizes, as it is."""
    torch.manual_seed(seed)
    return llama().eval()


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return quantize_model(llama(), kind).eval()


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The layer's weight dequantized here, by the libraries' calls (a fresh layer: in
    bitsandbytes' standard layout)."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    if isinstance(layer, bnb.nn.Linear8bitLt):
        scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        return layer.weight.data.float() * scales[:, None] / 127
    return layer.weight.dequantize()


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if ".layers." in name and name.endswith("_proj")
            and not isinstance(m, tp.nn.AdapterLayer)}  # fmt: skip


def twin(kind: str, seed: int = 0) -> nn.Module:
    """The model of ``build(kind)`` with every quantized projection an ``nn.Linear``
    holding its dequantized weight."""
    model = build(kind, seed)
    for name, layer in quantized_layers(model).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(dequantized(layer))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model.eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state, torchao's tensors as their integer data and scales."""
    state = {}
    for key, value in model.state_dict().items():
        if isinstance(value, Int8Tensor):
            state[f"{key}.qdata"], state[f"{key}.scale"] = value.qdata.clone(), value.scale.clone()
        else:
            state[key] = value.clone()
    return state


def assert_unchanged(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = snapshot(model)
    assert now.keys() == state.keys() and all(torch.equal(now[key], state[key]) for key in state)


def copy_adapters(source: nn.Module, destination: nn.Module) -> None:
    adapters = {key: value for key, value in source.state_dict().items() if ".adapters." in key}
    assert adapters and not destination.load_state_dict(adapters, strict=False).unexpected_keys


def inputs_and_labels():
    inputs = batch("llama")
    return inputs, inputs["input_ids"]


def train(model, steps=15, lr=2e-2):
    """AdamW steps on the causal LM loss; the losses, every gradient checked finite."""
    inputs, labels = inputs_and_labels()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
        optimizer.step()
        losses.append(loss.item())
    return losses


def adapted(kind, method):
    model = build(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FLoRA's rank clipping
        tp.inject(model, METHODS[method]("all-linear"))
    return model


# --------------------------------------------------------------------------- the whole flow

FLOW = [(kind, method) for kind in ("nf4", "int8") for method in METHODS] + [
    ("torchao-int8", "lora"), ("torchao-int8", "flora"), ("torchao-int8", "liera"),
    ("fp4-double", "lora"), ("nf4-double", "liera"), ("fp4", "snell"),
]  # fmt: skip


@pytest.mark.parametrize("kind,method", FLOW)
def test_every_method_trains_saves_loads_and_merges_over_a_quantized_base(kind, method, tmp_path):
    inputs, _ = inputs_and_labels()
    with torch.no_grad():  # in training mode: bitsandbytes' CPU inference kernel rounds its scales to bfloat16
        base_out = logits(build(kind).train(), inputs)
    model = adapted(kind, method)
    assert all(isinstance(layer.base_layer, QUANTIZED_TYPES[kind]) for layer in tp.model.adapter_layers(model).values())
    assert len(tp.model.adapter_layers(model)) == 14
    with torch.no_grad():
        init_out = logits(model.train(), inputs)
    if not method.startswith("snell"):  # SNELL's embeddings start random
        torch.testing.assert_close(init_out, base_out, rtol=0, atol=1e-6)

    losses = train(model)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = logits(model, inputs)

    # save -> fresh quantized model -> load: exact
    tp.save_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(tp.load_adapter(build(kind), tmp_path), inputs), trained, rtol=0, atol=0)

    # onto the full-precision model: the same adapter (the twin below checks the outputs)
    original = tp.load_adapter(full_precision(), tmp_path)
    adapters = {key: value for key, value in model.state_dict().items() if ".adapters." in key}
    assert all(torch.equal(original.state_dict()[key], value) for key, value in adapters.items())

    # a fresh quantized model with the adapter computes what the dequantized twin does (up
    # to bitsandbytes' int8 rounding of the activations in Linear8bitLt)
    fresh, reference = tp.load_adapter(build(kind), tmp_path), tp.load_adapter(twin(kind), tmp_path)
    with torch.no_grad():
        tolerance = 2e-2 if kind == "int8" else 1e-4
        torch.testing.assert_close(logits(fresh, inputs), logits(reference, inputs), rtol=tolerance, atol=tolerance)

    # merge: each weight is what the library's quantization of the twin's merged weight holds
    tp.merge(reference)
    with pytest.warns(RequantizationWarning, match=r"merged into 14 quantized layers .* differ from W0 \+ ΔW by up to") as caught:
        tp.merge(fresh)
    errors = [torch.linalg.norm(layer.weight - reference.get_submodule(name).base_layer.weight)
              / torch.linalg.norm(reference.get_submodule(name).base_layer.weight)
              for name, layer in tp.model.adapter_layers(fresh).items()]  # fmt: skip
    reported = float(re.search(r"by up to ([0-9.e-]+)", str(caught[-1].message)).group(1))
    assert reported == pytest.approx(max(errors).item(), rel=1e-2)
    expected = quantize_model(copy.deepcopy(reference), kind) if kind == "torchao-int8" else None
    for name, layer in tp.model.adapter_layers(fresh).items():
        if kind == "torchao-int8":
            want = dequantized(expected.get_submodule(name).base_layer)
        else:
            want = dequantized(quantize_linear(reference.get_submodule(name).base_layer, kind))
        torch.testing.assert_close(layer.weight, want, rtol=0, atol=1e-6, msg=name)
    model = fresh.train()  # unloaded, Linear4bit's own inference kernel would round its scales to bfloat16
    with torch.no_grad():
        merged_out = logits(model, inputs)

    # unmerge is refused, the model as it was; unload gives the quantized layers back
    state = snapshot(model)
    with pytest.raises(ValueError, match="module 'model.layers.0.*cannot be unmerged"):
        tp.unmerge(model)
    with pytest.raises(ValueError, match="cannot be unmerged"):
        tp.unload(model, merge=False)
    assert_unchanged(model, state)
    plain = tp.unload(model)
    assert all(type(m) is QUANTIZED_TYPES[kind] for m in quantized_layers(plain).values())
    with torch.no_grad():
        torch.testing.assert_close(logits(plain, inputs), merged_out, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-int8"])
def test_unload_dequantize_merges_into_full_precision_layers(kind):
    inputs, _ = inputs_and_labels()
    model, reference = adapted(kind, "lora"), twin(kind)
    tp.inject(reference, METHODS["lora"]("all-linear"))
    randomize_adapters(model)
    copy_adapters(model, reference)
    with torch.no_grad():
        expected = logits(reference, inputs)
        got = logits(model.train(), inputs)
    tolerance = 2e-2 if kind == "int8" else 1e-4  # bitsandbytes' int8 rounding of the activations
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no requantization, no warning
        plain = tp.unload(model, dequantize=True)
    tp.unload(reference)
    layers = quantized_layers(plain)
    assert len(layers) == 14 and all(type(m) is nn.Linear and not isinstance(m.weight, Int8Tensor) for m in layers.values())
    for name, layer in layers.items():
        torch.testing.assert_close(layer.weight, reference.get_submodule(name).weight, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(logits(plain, inputs), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- layer level


def layer_pair(kind, config, seed=0, shape=(64, 96)):
    """One quantized projection (``shape``: in, out) adapted by ``config`` (targets ``"0"``),
    and the same adapter over its dequantized twin."""
    torch.manual_seed(seed)
    linear = nn.Linear(*shape)
    if kind == "torchao-int8":
        base = copy.deepcopy(linear)
        quantize_(base, Int8WeightOnlyConfig())
    else:
        base = quantize_linear(linear, kind)
    twin_linear = nn.Linear(*shape)
    with torch.no_grad():
        twin_linear.weight.copy_(dequantized(base))
        twin_linear.bias.copy_(base.bias)
    model, reference = nn.Sequential(base), nn.Sequential(twin_linear)
    for m in (model, reference):
        tp.inject(m, config)
    randomize_adapters(model, scale=0.1)
    copy_adapters(model, reference)
    return model, reference


@pytest.mark.parametrize("kind", ["nf4", "fp4-double", "int8", "torchao-int8"])
@pytest.mark.parametrize("method", list(METHODS))
def test_outputs_and_gradients_equal_the_dequantized_twin(kind, method):
    """The update's output (the layer's output less its base's) and the adapter's gradients
    for a fixed output gradient are the twin's; the input gradient too, up to
    bitsandbytes' rounding in Linear8bitLt."""
    model, reference = layer_pair(kind, METHODS[method](["0"]))
    x, output_grad = torch.randn(2, 5, 64), torch.randn(2, 5, 96)
    updates, gradients = [], []
    for m in (model, reference):
        m.train()
        xi = x.clone().requires_grad_()
        out = m(xi)
        (out * output_grad).sum().backward()
        with torch.no_grad():
            updates.append(out - m[0].base_layer(x))
        gradients.append([p.grad for p in m.parameters() if p.requires_grad] + [xi.grad])
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-5, atol=1e-5)
    assert len(gradients[0]) == len(gradients[1]) > 1
    for got, want in zip(gradients[0][:-1], gradients[1][:-1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    tolerance = 1e-2 if kind == "int8" else 1e-5
    torch.testing.assert_close(gradients[0][-1], gradients[1][-1], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("kind", ["nf4", "fp4-double"])
def test_inference_keeps_the_4bit_weight_in_its_standard_layout(kind):
    """bitsandbytes' inference forward on CPUs with AVX512-BF16 repacks the weight for a
    kernel that rounds its scales to bfloat16 and has no backward; through the adapter
    layer the weight stays as it is, so inference computes what training does."""
    model, reference = layer_pair(kind, METHODS["lora"](["0"]))
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        out = model.eval()(x)
    assert not getattr(model[0].base_layer.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(out, reference.eval()(x).detach(), rtol=1e-5, atol=1e-5)
    layer = quantize_linear(nn.Linear(64, 96), kind)
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    with pytest.raises(ValueError, match="module '0': Linear4bit's weight is in bitsandbytes' CPU inference layout"):
        tp.inject(nn.Sequential(layer), METHODS["lora"](["0"]))


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-int8"])
@pytest.mark.parametrize("method", NEVER_DEQUANTIZE)
def test_methods_whose_update_does_not_involve_w0_never_dequantize_it(kind, method, monkeypatch):
    model, _ = layer_pair(kind, METHODS[method](["0"]))
    handler = model[0].quantization

    def refuse(layer):
        raise AssertionError("dequantized")

    monkeypatch.setattr(handler, "dequantize", refuse)
    model.train()
    model(torch.randn(3, 64)).sum().backward()
    model.eval()
    with torch.no_grad():
        model(torch.randn(3, 64))


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao-int8"])
@pytest.mark.parametrize("options", [{}, {"exp": "taylor1"}, {"group": "orthogonal"}, {"inner": "flora"}])
def test_liera_keeps_no_dequantized_weight_after_the_forward(kind, options, monkeypatch):
    model, reference = layer_pair(kind, tp.LieRAConfig(target_modules=["0"], r=4, **options))
    handler, made = model[0].quantization, []
    for name in ("dequantize", "dequantize_rows"):
        original = getattr(type(handler), name)

        def recorded(*args, original=original):
            weight = original(handler, *args)
            made.append(weakref.ref(weight))
            return weight

        monkeypatch.setattr(handler, name, recorded)
    x = torch.randn(4, 64)
    for m in (model, reference):
        m.train()
    out = model(x)
    gc.collect()
    assert made and all(ref() is None for ref in made)  # none alive between the forward and the backward
    count = len(made)
    out.square().sum().backward()
    assert len(made) > count  # made again in backward
    reference(x).square().sum().backward()
    for got, want in zip(model.parameters(), reference.parameters()):
        if want.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-3, atol=1e-4)


def _storages(tree) -> dict:
    """The tensors with data in ``tree`` by storage (a torchao tensor wraps such tensors)."""
    leaves = [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
    return {t.untyped_storage().data_ptr(): t for t in leaves if not is_traceable_wrapper_subclass(t)}


class _MadeTensors(TorchDispatchMode):
    """Records (entries, op) of each tensor an op makes while the mode is on (views of its
    inputs left out)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        read = _storages((args, kwargs))
        self.made.extend((t.numel(), str(func)) for ptr, t in _storages(out).items() if ptr not in read)
        return out

    @property
    def largest(self) -> tuple[int, str]:
        return max(self.made, default=(0, ""))


@pytest.mark.parametrize("method", ["snell", "snella"])
def test_snell_over_a_quantized_base_keeps_and_makes_nothing_weight_sized(method, monkeypatch):
    """SNELL's update over an nf4 base (x·ΔWᵀ, the base computing W0·x) keeps nothing of
    the weight's m·n values between forward and backward, and its backward (in column
    blocks of 64: _BLOCK_VALUES and _MIN_BLOCK_COLUMNS at their least) makes no tensor of
    m·n values: a block of ΔW's and Γ's columns at a time. Its gradients are those of x·ΔWᵀ with ΔW formed whole
    by the reference backend."""
    from tensor_peft.backends import cpu

    monkeypatch.setattr(cpu, "_BLOCK_VALUES", 1)
    monkeypatch.setattr(cpu, "_MIN_BLOCK_COLUMNS", 64)
    torch.manual_seed(0)
    model = nn.Sequential(quantize_linear(nn.Linear(256, 96), "nf4"))
    tp.inject(model, METHODS[method](["0"]))
    layer = model[0]
    adapter = layer.adapters["default"]
    x = torch.randn(2, 5, 256, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        update = layer.delta_forward(adapter, x)
    assert max(saved) < 96 * 256
    upstream = torch.randn_like(update)
    parameters = [x, *(p for p in adapter.parameters() if p.requires_grad)]
    with _MadeTensors() as spy:
        got = torch.autograd.grad(update, parameters, upstream)
    assert spy.largest[0] < 96 * 256, spy.largest
    with tp.backends.use("reference"):
        delta = layer.delta_weight(adapter)
        expected = torch.autograd.grad(torch.nn.functional.linear(x, delta), parameters, upstream)
    torch.testing.assert_close(update, torch.nn.functional.linear(x, delta.detach()), rtol=1e-5, atol=1e-6)
    for got_t, want in zip(got, expected):
        torch.testing.assert_close(got_t, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", [*BNB_4BIT, "int8", "torchao-int8", "torchao-int8-per-tensor"])
@pytest.mark.parametrize("in_features, out_features", [(64, 600), (128, 40), (96, 70), (200, 9), (101, 7)])
def test_dequantized_rows_are_the_rows_of_the_whole_dequantized_weight(kind, in_features, out_features):
    """``dequantize_rows`` over blocks of ``row_granularity`` rows (the last one short) gives
    the rows of the library's whole dequantization bit for bit: nested 4-bit blocks (64·256
    entries: 256 rows of 64), rows of whole 4-bit blocks, and rows that are not (96, 200,
    101 inputs: one block of all the rows; 7·101 entries: an odd count, its last byte half
    used); int8 rows with their scales."""
    torch.manual_seed(1)
    layer = nn.Linear(in_features, out_features)
    if kind.startswith("torchao"):
        quantize_(layer, Int8WeightOnlyConfig(granularity=PerTensor() if kind.endswith("per-tensor") else PerRow()))
    else:
        layer = quantize_linear(layer, kind)
    handler = quantized.quantization_of(layer)
    granularity = handler.row_granularity(layer)
    if kind in BNB_4BIT and in_features % 64:
        assert granularity == out_features
    whole = handler.dequantize(layer) if kind == "int8" else dequantized(layer)
    starts = range(0, out_features, granularity)
    parts = [handler.dequantize_rows(layer, start, min(start + granularity, out_features)) for start in starts]
    assert all(part.is_contiguous() for part in parts)
    assert torch.equal(torch.cat(parts), whole)
    if kind == "nf4-double" and in_features == 64:
        assert granularity == 256 and len(parts) == 3


@pytest.mark.parametrize("kind", ["nf4", "nf4-double", "int8", "torchao-int8"])
@pytest.mark.parametrize("exp", ["exact", "taylor1"])
def test_liera_forms_no_weight_sized_tensor_over_a_quantized_base(kind, exp, monkeypatch):
    """LieRA's update over a quantized Linear, forward and backward, in blocks of rows: no
    tensor an op makes has the m·n entries of W0 (a block's m_b·n at most), and outputs and
    gradients are the dequantized twin's."""
    monkeypatch.setattr(importlib.import_module("tensor_peft.ops.lowrank_hadamard_merge"), "DEQUANTIZED_ROW_BLOCK_ELEMENTS", 64 * 64)
    shape = (64, 600)
    model, reference = layer_pair(kind, tp.LieRAConfig(target_modules=["0"], r=4, exp=exp), shape=shape)
    layer = model[0]
    x, upstream = torch.randn(2, 5, 64), torch.randn(2, 5, 600)
    inputs = [x.clone().requires_grad_() for _ in range(2)]
    adapter = layer.adapters["default"]
    with _MadeTensors() as spy:  # the update's path alone: the base layer's own forward is bitsandbytes'
        update = layer.delta_forward(adapter, layer.adapter_input(adapter, inputs[0]))
        (update * upstream).sum().backward()
    assert spy.made and spy.largest[0] < 600 * 64, spy.largest
    twin = reference[0]
    expected = twin.delta_forward(twin.adapters["default"], inputs[1])
    (expected * upstream).sum().backward()
    torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad, rtol=1e-4, atol=1e-5)
    for got, want in zip(model.parameters(), reference.parameters()):
        if want.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- refusals


def test_refusals_name_the_module_and_the_reason():
    fp16 = nn.Sequential(bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=True))
    with pytest.raises(ValueError, match="module '0': Linear8bitLt holds a full-precision weight"):
        tp.inject(fp16, tp.LoRAConfig(target_modules=["0"]))
    assert type(fp16[0]) is bnb.nn.Linear8bitLt

    model = build("nf4")
    with pytest.raises(ValueError, match=r"module 'model.layers.0.mlp.down_proj': execution 'merged' needs the weight"):
        tp.inject(model, tp.FLoRAConfig(target_modules="all-linear", execution="merged"))
    assert not tp.model.adapter_layers(model)


def test_a_torchao_weight_it_cannot_quantize_back_refuses_the_merge_leaving_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(quantize_linear(nn.Linear(64, 64), "nf4"), nn.Linear(64, 16))
    quantize_(model[1], Int8WeightOnlyConfig(granularity=PerGroup(32)))
    tp.inject(model, tp.LoRAConfig(target_modules=["0", "1"], r=2))
    randomize_adapters(model)
    x = torch.randn(3, 64)
    before, state = model(x), snapshot(model)
    with pytest.raises(ValueError, match=r"module '1': cannot merge into this torchao layer: .*Int8Tensor per row or per "
                                         r"tensor only; unload\(merge=True, dequantize=True\)"):  # fmt: skip
        tp.merge(model)
    assert model[0].merged_adapters == model[1].merged_adapters == []
    assert_unchanged(model, state)
    plain = tp.unload(model, dequantize=True)
    torch.testing.assert_close(plain(x), before, rtol=1e-5, atol=1e-5)


def test_layers_whose_forward_is_unknown_are_still_refused():
    class Scaled(bnb.nn.Linear4bit):
        def forward(self, x):
            return 2 * super().forward(x)

    scaled = nn.Sequential(Scaled(8, 8).to("cpu"))
    with pytest.raises(ValueError, match="module '0': Scaled subclasses nn.Linear but overrides forward"):
        tp.inject(scaled, tp.LoRAConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="module '0': Linear4bit's weight is not quantized yet"):
        tp.inject(nn.Sequential(bnb.nn.Linear4bit(8, 8, device="meta")), tp.LoRAConfig(target_modules=["0"]))


# --------------------------------------------------------------------------- training setup


def bfloat16_nf4_llama() -> nn.Module:
    """The tiny LLaMA in bfloat16 with nf4 projections computing in bfloat16, as QLoRA loads one."""
    torch.manual_seed(0)
    model = llama().to(torch.bfloat16)
    for name, module in list(model.named_modules()):
        if is_projection(name, module):
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=False, quant_type="nf4",
                                      compress_statistics=True, compute_dtype=torch.bfloat16)  # fmt: skip
            layer.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to("cpu"))
    return model


def test_prepare_for_kbit_training_sets_the_dtypes_peft_does_and_trains_with_checkpointing():
    expected = peft.prepare_model_for_kbit_training(bfloat16_nf4_llama(), use_gradient_checkpointing=False)
    model = bfloat16_nf4_llama()
    weights = {name: layer.weight.data.clone() for name, layer in quantized_layers(model).items()}
    assert tp.prepare_for_kbit_training(model) is model
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes == {name: p.dtype for name, p in expected.named_parameters()}
    assert dtypes["model.norm.weight"] == dtypes["lm_head.weight"] == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(layer.weight.data, weights[name]) for name, layer in quantized_layers(model).items())
    assert model.is_gradient_checkpointing

    with pytest.raises(TypeError, match="gradient_checkpointing needs a transformers model"):
        tp.prepare_for_kbit_training(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_under_bfloat16_autocast_with_gradient_checkpointing(method):
    """A bfloat16 model with nf4 projections, prepared, under bfloat16 autocast: finite
    gradients on every adapter parameter, the same with checkpointing as without."""
    inputs, labels = inputs_and_labels()
    gradients = []
    for checkpointing in (True, False):
        model = tp.prepare_for_kbit_training(bfloat16_nf4_llama(), gradient_checkpointing=checkpointing)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FLoRA's rank clipping
            tp.inject(model, METHODS[method]("all-linear"))
        randomize_adapters(model)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**inputs, labels=labels).loss.backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) >= 14
    assert all(torch.isfinite(grad).all() for grad in gradients[0].values())
    assert sum(grad.abs().sum() > 0 for grad in gradients[0].values()) >= 14
    for name, grad in gradients[0].items():
        torch.testing.assert_close(grad, gradients[1][name], rtol=1e-3, atol=1e-5, msg=name)


# --------------------------------------------------------------------------- peft


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["lora", "mtlora", "flora"])
def test_peft_export_from_a_quantized_model_loads_in_peft(kind, method, tmp_path):
    model = adapted(kind, method)
    randomize_adapters(model)
    tp.save_adapter(model, tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(build(kind), tmp_path)
    layers = [m for m in loaded.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(layers) == 14 and all(isinstance(m.get_base_layer(), QUANTIZED_TYPES[kind]) for m in layers)
    inputs, _ = inputs_and_labels()
    with torch.no_grad():  # in training mode: peft's layers run Linear4bit's own forward, whose CPU inference kernel rounds
        torch.testing.assert_close(logits(loaded.train(), inputs), logits(model.train(), inputs), rtol=1e-4, atol=1e-4)


def test_the_package_imports_neither_library():
    code = "import sys, tensor_peft; print(sorted(m for m in sys.modules if m.split('.')[0] in ('bitsandbytes', 'torchao')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=pathlib.Path(__file__).resolve().parents[1])  # fmt: skip
    assert result.stdout.strip() == "[]"
