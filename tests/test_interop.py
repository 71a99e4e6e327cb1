"""Adapters leave and enter the package: export to peft's LoRA format loaded by peft
itself (outputs equal), import of adapters peft made, and modules_to_save trained,
saved and loaded with the adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensor_peft as tp

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.embed = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, ids):
        return self.fc(self.conv(x).mean((2, 3)) + self.embed(ids))


def conv_net():
    torch.manual_seed(0)
    return ConvNet().eval()


def conv_inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 6, 6, generator=generator), torch.tensor([1, 7])


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)).eval()


def randomize(model, scale=0.1, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


IDS = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))

EXPORTABLE = {
    "lora": lambda t: tp.LoRAConfig(target_modules=t, r=3, alpha=5.0),
    "mtlora": lambda t: tp.MTLoRAConfig(target_modules=t, r=3, variant="ctcm"),
    "flora": lambda t: tp.FLoRAConfig(target_modules=t, r=3, scale=0.7),
}


@pytest.mark.parametrize("method", EXPORTABLE)
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2])
def test_export_to_peft_gives_the_same_outputs(tmp_path, method, make_model):
    model = make_model()
    tp.inject(model, EXPORTABLE[method]("all-linear"))
    randomize(model)
    with torch.no_grad():
        expected = model(IDS).logits
    tp.save_adapter(model, tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(make_model(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", EXPORTABLE)
def test_conv_and_embedding_export_to_peft(tmp_path, method):
    model = conv_net()
    tp.inject(model, EXPORTABLE[method](["conv", "embed", "fc"]), "default")
    randomize(model)
    x, ids = conv_inputs()
    with torch.no_grad():
        expected = model(x, ids)
    tp.save_adapter(model, tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(conv_net(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config,reason", [
    (tp.LieRAConfig(target_modules=["fc"]), "LieRA's .* is multiplicative"),
    (tp.SNELLConfig(target_modules=["fc"], r=2), "SNELL's sparsified kernelized"),
])
def test_methods_peft_cannot_hold_refuse_to_export(tmp_path, config, reason):
    model = conv_net()
    tp.inject(model, config)
    with pytest.raises(ValueError, match=f"module 'fc': {reason}"):
        tp.save_adapter(model, tmp_path, format="peft")
    assert not any(tmp_path.iterdir())


def test_a_peft_lora_adapter_loads_as_lora_with_the_same_outputs(tmp_path):
    peft_model = peft.get_peft_model(conv_net(), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["conv", "embed"],
                                                                  modules_to_save=["fc"]))  # fmt: skip
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(tmp_path)
    x, ids = conv_inputs()
    with torch.no_grad():
        expected = peft_model.eval()(x, ids)
    model = conv_net()
    tp.load_adapter(model, tmp_path)
    assert model.tensor_peft_configs["default"].method == "lora"
    with torch.no_grad():
        torch.testing.assert_close(model(x, ids), expected, rtol=1e-5, atol=1e-6)


def test_peft_options_without_an_equivalent_raise(tmp_path):
    peft.get_peft_model(conv_net(), peft.LoraConfig(r=2, target_modules=["fc"], use_dora=True)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_dora=True has no equivalent"):
        tp.load_adapter(conv_net(), tmp_path)


def test_modules_to_save_train_save_load_and_survive_a_second_adapter(tmp_path):
    model = conv_net()
    tp.inject(model, tp.LoRAConfig(target_modules=["conv"], r=2, modules_to_save=["fc"]))
    assert all(p.requires_grad for p in model.fc.parameters())
    x, ids = conv_inputs()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x, ids).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.fc.weight, conv_net().fc.weight)  # the head trained
    tp.inject(model, tp.LoRAConfig(target_modules=["embed"], r=2), "second")
    assert not any(p.requires_grad for p in model.fc.parameters())  # "second" does not save fc
    tp.set_adapter(model, "default")
    assert all(p.requires_grad for p in model.fc.parameters())
    with torch.no_grad():
        expected = model(x, ids)
    tp.save_adapter(model, tmp_path)
    fresh = conv_net()
    tp.load_adapter(fresh, tmp_path)
    assert fresh.tensor_peft_configs["default"].modules_to_save == ["fc"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, ids), expected, rtol=0, atol=0)
    # and through peft's format: peft restores the head from the file too
    tp.save_adapter(model, tmp_path / "peft", format="peft")
    loaded = peft.PeftModel.from_pretrained(conv_net(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, ids), expected, rtol=1e-5, atol=1e-6)


def test_modules_to_save_errors_name_the_module():
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no module"):
        tp.inject(conv_net(), tp.LoRAConfig(target_modules=["conv"], modules_to_save=["head"]))
    with pytest.raises(TypeError, match="modules_to_save must be a list of module names"):
        tp.LoRAConfig(target_modules=["conv"], modules_to_save="fc")


def test_a_peft_adapter_with_dropout_loads_in_eval_mode_with_peft_outputs(tmp_path):
    peft_model = peft.get_peft_model(conv_net(), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["conv", "fc"],
                                                                  lora_dropout=0.5))  # fmt: skip
    randomize(peft_model, scale=0.3)
    peft_model.save_pretrained(tmp_path)
    x, ids = conv_inputs()
    with torch.no_grad():
        expected = peft_model.eval()(x, ids)
    model = conv_net()  # in eval mode
    tp.load_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(x, ids), expected, rtol=1e-5, atol=1e-6)


def conv_model(**options):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, **{"padding": 1, **options})).eval()


# conv options peft's LoRA computes differently: its update conv pads with zeros, has no
# dilation, and its A mixes every input channel
PEFT_DIFFERS = [
    ({"padding_mode": "reflect"}, "padding_mode='reflect'"),
    ({"padding_mode": "circular"}, "padding_mode='circular'"),
    ({"dilation": 2}, "dilation=\\(2, 2\\)"),
    ({"groups": 2}, "groups=2"),
]


@pytest.mark.parametrize("options,option", PEFT_DIFFERS)
@pytest.mark.parametrize("method", EXPORTABLE)
def test_convs_peft_computes_differently_refuse_export(tmp_path, method, options, option):
    model = conv_model(**options)
    tp.inject(model, EXPORTABLE[method](["0"]))
    with pytest.raises(ValueError, match=f"module '0': {option}: peft"):
        tp.save_adapter(model, tmp_path, format="peft")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("options,option", PEFT_DIFFERS)
def test_peft_adapters_on_convs_computed_differently_refuse_import(tmp_path, options, option):
    peft_model = peft.get_peft_model(conv_model(**options), peft.LoraConfig(r=2, target_modules=["0"]))
    peft_model.save_pretrained(tmp_path)
    model = conv_model(**options)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"module '0': {option}: peft"):
        tp.load_adapter(model, tmp_path)
    assert type(model[0]) is nn.Conv2d and not hasattr(model, "tensor_peft_configs")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("make_conv", [
    lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1),
    lambda: nn.Conv2d(4, 8, (2, 3), padding="same"),
    lambda: nn.Conv1d(4, 8, 3, padding="valid"),
])  # fmt: skip
def test_convs_peft_computes_alike_export_and_import_exactly(tmp_path, make_conv):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(make_conv()).eval()

    x = torch.randn(2, 4, *[7] * (make()[0].weight.dim() - 2), generator=torch.Generator().manual_seed(1))
    model = make()
    tp.inject(model, tp.LoRAConfig(target_modules=["0"], r=2, alpha=3.0))
    randomize(model, scale=0.3)
    with torch.no_grad():
        expected = model(x)
    tp.save_adapter(model, tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    fresh = make()
    tp.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-6)
