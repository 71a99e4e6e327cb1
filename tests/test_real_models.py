"""Every method on tiny random-init versions of the models people fine-tune (transformers
LLaMA, GPT-2, BERT, ViT; a torch TransformerEncoder with an embedding): output unchanged
at init, a bfloat16-autocast training step, dtype casts, save -> fresh model -> load,
merge == unmerged, gradient checkpointing. Then the layer types these models bring
(Conv1D, Embedding, MultiheadAttention) against hand-written references, tied weights,
"all-linear", and the TransformerEncoderLayer fast path."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensor_peft as tp

transformers = pytest.importorskip("transformers")

VOCAB = 64


def llama(tie=False):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=tie)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def vit():
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=3)  # fmt: skip
    return transformers.ViTForImageClassification(config)


class Encoder(nn.Module):
    """An embedding, a torch TransformerEncoder (batch first, 2 layers) and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)).mean(1))


MODELS = {"llama": llama, "gpt2": gpt2, "bert": bert, "vit": vit, "encoder": Encoder}
TARGETS = {name: {"target_modules": "all-linear"} for name in MODELS} | {
    "bert": {"target_modules": "all-linear", "exclude_modules": ["classifier"]},  # a 3-way head: trained whole
    "vit": {"target_modules": "all-linear", "exclude_modules": ["classifier"]},
    "encoder": {"target_modules": ["embed", nn.MultiheadAttention, "linear1", "linear2"]},
}

METHODS = {
    "lora": lambda t: tp.LoRAConfig(**t, r=4),
    "mtlora": lambda t: tp.MTLoRAConfig(**t, r=4, variant="icfm"),
    "flora-auto": lambda t: tp.FLoRAConfig(**t, r=4),
    "flora-merged": lambda t: tp.FLoRAConfig(**t, r=4, execution="merged"),
    "flora-factorized": lambda t: tp.FLoRAConfig(**t, r=4, execution="factorized"),
    "liera": lambda t: tp.LieRAConfig(**t, r=4),
    "liera-taylor1": lambda t: tp.LieRAConfig(**t, r=4, exp="taylor1"),
    "liera-orthogonal": lambda t: tp.LieRAConfig(**t, group="orthogonal", block_size=4),
    "snell": lambda t: tp.SNELLConfig(**t, r=4),
    "snella": lambda t: tp.SNELLAConfig(**t, r=4),
    "mtlora-dtsm": lambda t: tp.MTLoRAConfig(**t, r=4, variant="dtsm"),
}


def build(model_name, seed=0):
    torch.manual_seed(seed)
    return MODELS[model_name]().eval()


def batch(model_name, seed=1):
    generator = torch.Generator().manual_seed(seed)
    if model_name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    ids = torch.randint(0, VOCAB, (2, 6), generator=generator)
    return {"ids": ids} if model_name == "encoder" else {"input_ids": ids}


def logits(model, inputs):
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def randomize_adapters(model, seed=3, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                parameter.add_((noise * scale).to(parameter.dtype))


def adapted(model_name, method, seed=0):
    model = build(model_name, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FLoRA rank clipping on the 3-way heads
        tp.inject(model, METHODS[method](TARGETS[model_name]))
    return model


CASES = [(m, k) for m in MODELS for k in METHODS]


@pytest.mark.parametrize("model_name,method", CASES)
def test_zoo(model_name, method, tmp_path):
    inputs = batch(model_name)
    with torch.no_grad():
        base_out = logits(build(model_name), inputs)
    model = adapted(model_name, method)
    assert tp.trainable_parameter_count(model) > 0
    with torch.no_grad():
        init_out = logits(model, inputs)
    if not method.startswith("snell"):  # SNELL's embeddings start random
        torch.testing.assert_close(init_out, base_out, rtol=1e-5, atol=1e-5)

    # a bfloat16-autocast training step: finite gradients on every adapter parameter
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = logits(model, inputs).float().square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()
    model.eval()

    randomize_adapters(model)
    with torch.no_grad():
        trained = logits(model, inputs)
    assert not torch.allclose(trained, base_out, atol=1e-4)

    # casts: a bfloat16 model runs; float64 and back is exact
    model.double().float()
    with torch.no_grad():
        torch.testing.assert_close(logits(model, inputs), trained, rtol=0, atol=0)
        half_out = logits(copy.deepcopy(model).bfloat16(), inputs)
    assert half_out.dtype == torch.bfloat16 and torch.isfinite(half_out).all()

    # save -> fresh model -> load: exact
    tp.save_adapter(model, tmp_path)
    fresh = build(model_name)
    tp.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(fresh.eval(), inputs), trained, rtol=0, atol=0)

    # merge == unmerged, and unmerge gives the unmerged model back
    tp.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, inputs), trained, rtol=1e-4, atol=1e-5)
    tp.unmerge(model)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, inputs), trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "flora-merged", "liera", "snell"])
@pytest.mark.parametrize("model_name", ["llama", "gpt2", "bert", "vit"])
def test_gradient_checkpointing_gives_the_same_gradients(model_name, method):
    inputs = batch(model_name)
    gradients = []
    for checkpointing in (False, True):
        model = adapted(model_name, method)
        randomize_adapters(model)
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5, same call
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        logits(model, inputs).square().mean().backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- layer types


def test_conv1d_lora_matches_the_transposed_linear_reference():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(12, 8))  # nf=12 outputs, nx=8 inputs: weight (8, 12)
    x = torch.randn(5, 8)
    tp.inject(model, tp.LoRAConfig(target_modules=[Conv1D], r=3, alpha=6.0))
    randomize_adapters(model, scale=0.3)
    layer = model[0]
    A, B = layer.adapters["default"].lora_A, layer.adapters["default"].lora_B
    weight, bias = layer.base_layer.weight, layer.base_layer.bias
    expected = x @ (weight + (2.0 * B @ A).T) + bias
    torch.testing.assert_close(model(x), expected)
    tp.merge(model)
    torch.testing.assert_close(weight, (weight - (2.0 * B @ A).T) + (2.0 * B @ A).T)  # written through the view
    torch.testing.assert_close(model(x), expected)


def _embedding_reference(method, adapter, weight, ids):
    """The looked-up rows of the effective embedding weight, from the method's formula."""
    if method == "lora":
        delta = adapter.scale * adapter.lora_B @ adapter.lora_A  # (dim, num) in the linear layout
        return F.embedding(ids, weight + delta.T)
    if method == "flora":
        delta = adapter.scale * adapter.factors[0] @ adapter.core @ adapter.factors[1].T
        return F.embedding(ids, weight + delta.T)
    update = adapter.update
    delta = update.scale * update.lora_B @ update.lora_A
    return F.embedding(ids, weight * torch.exp(delta.T))


@pytest.mark.parametrize("method", ["lora", "flora", "liera"])
def test_embedding_adapters_match_the_formula_and_train(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6, padding_idx=0))
    config = {"lora": tp.LoRAConfig, "flora": tp.FLoRAConfig, "liera": tp.LieRAConfig}[method]
    tp.inject(model, config(target_modules=[nn.Embedding], r=3))
    randomize_adapters(model, scale=0.3)
    ids = torch.tensor([[0, 3, 19], [5, 5, 7]])
    layer = model[0]
    expected = _embedding_reference(method, layer.adapters["default"], layer.base_layer.weight, ids)
    out = model(ids)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    tp.merge(model)
    torch.testing.assert_close(model(ids), expected.detach())


def test_embedding_rejects_dropout_and_max_norm():
    with pytest.raises(ValueError, match="module '0': dropout must be 0 on an nn.Embedding"):
        tp.inject(nn.Sequential(nn.Embedding(5, 4)), tp.LoRAConfig(target_modules=["0"], dropout=0.1))
    with pytest.raises(ValueError, match="module '0': .*max_norm"):
        tp.inject(nn.Sequential(nn.Embedding(5, 4, max_norm=1.0)), tp.LoRAConfig(target_modules=["0"]))


def _attention_reference(attention, layers, x):
    """The attention by torch's functional form with the projections' effective weights
    written out by LoRA's formula."""

    def effective(layer):
        adapter = layer.adapters["default"]
        return layer.weight + adapter.scale * adapter.lora_B @ adapter.lora_A

    return F.multi_head_attention_forward(
        x, x, x, attention.embed_dim, attention.num_heads, effective(layers["in_proj"]), attention.in_proj_bias,
        None, None, False, 0.0, effective(layers["out_proj"]), attention.out_proj.bias, training=False,
        need_weights=False,
    )[0]  # fmt: skip


@pytest.mark.parametrize("target", [nn.MultiheadAttention, nn.Linear])
def test_multihead_attention_projections_are_adapted(target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    x = torch.randn(4, 2, 8)
    with torch.no_grad():
        base = model[0](x, x, x, need_weights=False)[0]
    tp.inject(model, tp.LoRAConfig(target_modules=[target], r=2))
    wrapper = model[0]
    expected_projections = {"in_proj", "out_proj"} if target is nn.MultiheadAttention else {"out_proj"}
    assert set(wrapper.projections()) == expected_projections
    randomize_adapters(model, scale=0.3)
    out = wrapper(x, x, x, need_weights=False)[0]
    assert not torch.allclose(out, base, atol=1e-4)
    if target is nn.MultiheadAttention:
        torch.testing.assert_close(out, _attention_reference(wrapper.base_layer, wrapper.projections(), x))
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert set(model.state_dict()) >= {"0.base_layer.in_proj_weight", "0.base_layer.out_proj.weight"}
    plain = tp.unload(model)
    assert type(plain[0]) is nn.MultiheadAttention
    with torch.no_grad():
        torch.testing.assert_close(plain[0](x, x, x, need_weights=False)[0], out.detach())


def test_subclass_with_its_own_forward_is_refused_with_the_reason():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match="module '0': Scaled subclasses nn.Linear but overrides forward"):
        tp.inject(nn.Sequential(Scaled(4, 4)), tp.LoRAConfig(target_modules=[nn.Linear]))


# --------------------------------------------------------------------------- model-level rules


def test_all_linear_takes_every_linear_layer_but_the_output_head():
    model = llama()
    tp.inject(model, tp.LoRAConfig(target_modules="all-linear", r=2))
    adapted_names = set(tp.model.adapter_layers(model))
    linear = {n for n, m in llama().named_modules() if isinstance(m, nn.Linear)}
    assert adapted_names == linear - {"lm_head"}

    model = gpt2()
    tp.inject(model, tp.LoRAConfig(target_modules="all-linear", r=2))
    kinds = {type(layer.base_layer).__name__ for layer in tp.model.adapter_layers(model).values()}
    assert kinds == {"Conv1D"} and "lm_head" not in tp.model.adapter_layers(model)


def test_tied_weights_warn_at_inject_and_merge_refuses_leaving_the_model_as_it_was():
    model = gpt2().eval()
    inputs = batch("gpt2")
    with pytest.warns(UserWarning, match="'lm_head' shares its weight with module 'transformer.wte'"):
        tp.inject(model, tp.LoRAConfig(target_modules=["lm_head", "c_attn"], r=2))
    randomize_adapters(model)
    with torch.no_grad():
        before = logits(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (tp.merge, tp.unload):
        with pytest.raises(ValueError, match="module 'lm_head': its weight is tied to module 'transformer.wte'"):
            call(model)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=0)
    plain = tp.unload(model, merge=False)  # taking the adapters out writes nothing
    assert plain.lm_head.weight is plain.transformer.wte.weight


def test_a_failed_inject_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # block_size 4 divides 8 but not 6 or 10: the others fail after the first was wrapped, each named
    with pytest.raises(ValueError, match=r"module '1': block_size 4 must divide .*\(6\); module '2': .*\(10\)"):
        tp.inject(model, tp.LieRAConfig(target_modules=[nn.Linear], group="orthogonal", block_size=4))
    assert [type(m) for m in model] == [nn.Linear, nn.Linear, nn.Linear]
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "tensor_peft_configs")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_transformer_encoder_fast_path_does_not_skip_the_adapters():
    torch.manual_seed(0)
    model = Encoder().eval()
    tp.inject(model, tp.LoRAConfig(target_modules=["linear1", "linear2"], r=2))
    randomize_adapters(model, scale=0.3)
    ids = batch("encoder")["ids"]
    with torch.no_grad():  # eval + no_grad: the conditions of PyTorch's fused fast path
        unmerged = model(ids)
        tp.merge(model)  # the merged weights are what any path reads
        merged = model(ids)
    torch.testing.assert_close(unmerged, merged, rtol=1e-5, atol=1e-6)
    plain = tp.unload(model)
    assert not plain.encoder.layers[0]._forward_pre_hooks


def test_every_module_cast_keeps_working():
    """.to / .half / .bfloat16 / .float / .cpu on every method (LieRA's used to raise)."""
    for method in METHODS:
        model = adapted("encoder", method)
        model.to(torch.bfloat16).half().bfloat16().float().cpu().to("cpu", torch.float64)
        assert all(p.dtype == torch.float64 for p in model.parameters())
        assert math.isfinite(model(batch("encoder")["ids"]).sum().item())


def test_fully_sharded_training_equals_one_process(tmp_path):
    """FSDP2 (``fully_shard``, gloo, 2 processes) for every method: one SGD step on two
    ranks' batches equals one step on their summed loss in one process."""
    from tests import fsdp_worker

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [str(tmp_path / "rendezvous"), str(tmp_path / "out")]
    script = os.path.join(root, "tests", "fsdp_worker.py")
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    procs = [subprocess.Popen([sys.executable, script, str(rank), *args], cwd=root, stdout=log.open("w"),
                              stderr=subprocess.STDOUT) for rank, log in enumerate(logs)]  # fmt: skip
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], "\n".join(f"rank {r}: {log.read_text()[-3000:]}" for r, log in enumerate(logs))
    results = torch.load(tmp_path / "out")
    for (method, per_layer), sharded in results.items():
        model = fsdp_worker.model_for(method)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        loss = sum(model(fsdp_worker.batch(rank)).square().sum() for rank in (0, 1)) / 2  # FSDP averages
        loss.backward()
        optimizer.step()
        expected = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        assert sharded.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(sharded[name], expected[name], msg=f"{method} per_layer={per_layer} {name}")
