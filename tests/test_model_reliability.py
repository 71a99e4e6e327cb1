"""Model-level calls are all or nothing and fail cleanly: a refused merge, unmerge,
unload, set_adapter, load or save leaves the model (and the disk) as it was, and the
error names the module or the argument. Adapters added to an eval model run in eval mode;
attention adapters follow the attention's weights when these are replaced; merge refuses
disabled adapters. The SNELLA allocator survives non-finite gradients, refuses to
reallocate a merged adapter, keeps layers with similar names apart and refuses state of
other layers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import tensor_peft as tp


def two_layers(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4)).to(dtype)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, state):
    assert snapshot(model).keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_merge_refused_by_one_layer_writes_no_layer():
    model = two_layers(torch.float16)
    tp.inject(model, tp.LoRAConfig(target_modules=[nn.Linear], r=2))
    with torch.no_grad():
        model[0].adapters["default"].lora_B.fill_(0.01)
        model[2].adapters["default"].lora_B.fill_(1e6)  # ΔW overflows float16 in the second layer only
    x = torch.randn(3, 6, dtype=torch.float16)
    before, state = model(x), snapshot(model)
    for call in (tp.merge, tp.unload):
        with pytest.raises(ValueError, match="module '2': cannot merge adapter 'default': the weight would hold non-finite"):
            call(model)
        assert_unchanged(model, state)
        assert model[0].merged_adapters == [] and "default" in model.tensor_peft_configs
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_taylor1_merge_that_would_zero_the_weight_refuses_before_writing():
    model = two_layers(torch.float64)
    tp.inject(model, tp.LieRAConfig(target_modules=["0"], r=1, alpha=1.0, exp="taylor1"))
    adapter = model[0].adapters["default"].update
    with torch.no_grad():  # 1 + ΔW = 0 at entry (0, 0): ΔW = B·A with B[0] = -1, A[0, 0] = 1
        adapter.lora_A.zero_()
        adapter.lora_A[0, 0] = 1.0
        adapter.lora_B.zero_()
        adapter.lora_B[0, 0] = -1.0
    state = snapshot(model)
    with pytest.raises(ValueError, match="module '0': .*zero non-zero entries of the weight"):
        tp.merge(model)
    assert_unchanged(model, state)


def test_exact_merge_whose_exponential_underflows_refuses():
    model = two_layers(torch.float16)
    tp.inject(model, tp.LieRAConfig(target_modules=["0"], r=1, alpha=1.0))
    with torch.no_grad():
        model[0].adapters["default"].update.lora_A.fill_(1.0)
        model[0].adapters["default"].update.lora_B.fill_(-20.0)  # W0·exp(-20) is below float16's smallest subnormal
    state = snapshot(model)
    with pytest.raises(ValueError, match="module '0': .*unmerge could not restore"):
        tp.merge(model)
    assert_unchanged(model, state)


def test_set_adapter_while_another_is_merged_refuses():
    model = two_layers()
    tp.inject(model, tp.LoRAConfig(target_modules=[nn.Linear], r=2))
    tp.inject(model, tp.LoRAConfig(target_modules=["0"], r=2), "other")
    tp.set_adapter(model, "default")
    tp.merge(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="module '0': adapter 'default' is merged into the weight"):
        tp.set_adapter(model, "other")
    assert model[0].active_adapters == ["default"] and model[2].active_adapters == ["default"]
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="module '0' has adapter 'default' merged"):
        tp.inject(model, tp.LoRAConfig(target_modules=["2"], r=2), "third")
    tp.unmerge(model)
    tp.set_adapter(model, "other")
    assert model[0].active_adapters == ["other"] and model[2].active_adapters == []


def test_a_failed_load_under_a_new_name_leaves_the_active_adapter(tmp_path):
    model = two_layers()
    tp.inject(model, tp.LoRAConfig(target_modules=[nn.Linear], r=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3)
    other = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 4))  # other widths: does not fit
    tp.inject(other, tp.LoRAConfig(target_modules=[nn.Linear], r=2))
    tp.save_adapter(other, tmp_path)
    x = torch.randn(2, 6)
    before, state = model(x), snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="module '0': saved lora_B has shape"):
        tp.load_adapter(model, tmp_path, "second")
    assert_unchanged(model, state)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert list(model.tensor_peft_configs) == ["default"]
    assert model[0].active_adapters == ["default"] and list(model[0].adapters) == ["default"]
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("content,message", [
    ("{not json", "holds no readable adapter: JSONDecodeError"),
    (json.dumps({"method": "lora"}), "is not a tensor_peft adapter config: KeyError"),
    (json.dumps({"method": "lora", "config": {"target_modules": "0"}}), "target_modules must be a list"),
    (json.dumps({"method": "lora", "config": {"target_modules": ["0"], "rank": 3}}), "does not fit LoRAConfig"),
])
def test_a_malformed_config_file_raises_naming_it(tmp_path, content, message):
    (tmp_path / "adapter_config.json").write_text(content)
    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    model = two_layers()
    with pytest.raises(ValueError, match=message):
        tp.load_adapter(model, tmp_path)
    assert not hasattr(model, "tensor_peft_configs")


def test_a_save_that_cannot_write_writes_nothing(tmp_path):
    model = two_layers()
    tp.inject(model, tp.LoRAConfig(target_modules=[nn.Linear], r=2))
    (tmp_path / "adapter_config.json").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        tp.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json"]


@pytest.mark.parametrize("make_config,error,message", [
    (lambda: tp.LoRAConfig(target_modules="(("), ValueError, "target_modules '\\(\\(' is not a valid regular"),
    (lambda: tp.LoRAConfig(target_modules=[123]), TypeError, "target_modules entries must be module names"),
    (lambda: tp.LoRAConfig(target_modules=["a"], exclude_modules="[x"), ValueError, "exclude_modules"),
    (lambda: tp.LoRAConfig(target_modules=["a"], dtype="int32"), ValueError, "dtype must name a floating"),
])
def test_config_errors_name_the_field(make_config, error, message):
    with pytest.raises(error, match=message):
        make_config()


def randomize_adapters(model, seed=3, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".adapters." in name:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def lora_weight(layer, adapter_name="default"):
    """W0 + s·B·A, written out for a linear LoRA layer."""
    adapter = layer.adapters[adapter_name]
    return layer.base_layer.weight + adapter.scale * adapter.lora_B @ adapter.lora_A


def test_adapters_added_to_an_eval_model_run_in_eval_mode(tmp_path):
    model = two_layers().eval()
    tp.inject(model, tp.LoRAConfig(target_modules=[nn.Linear], r=2, dropout=0.5))
    tp.inject(model, tp.LoRAConfig(target_modules=["0"], r=3, dropout=0.5), "second")  # onto existing layers
    randomize_adapters(model)
    assert not any(module.training for module in model.modules())
    x = torch.randn(5, 6)
    hidden = torch.tanh(F.linear(x, lora_weight(model[0], "second"), model[0].bias))
    torch.testing.assert_close(model(x), F.linear(hidden, model[2].weight, model[2].bias))
    tp.set_adapter(model, "default")
    tp.save_adapter(model, tmp_path)
    fresh = two_layers().eval()
    tp.load_adapter(fresh, tmp_path)
    assert not any(module.training for module in fresh.modules())
    hidden = torch.tanh(F.linear(x, lora_weight(model[0]), model[0].bias))
    torch.testing.assert_close(fresh(x), F.linear(hidden, lora_weight(model[2]), model[2].bias))
    attention = nn.Sequential(nn.MultiheadAttention(8, 2)).eval()
    tp.inject(attention, tp.LoRAConfig(target_modules=[nn.MultiheadAttention], r=2, dropout=0.5))
    assert not any(module.training for module in attention.modules())
    fresh.train()  # the flag follows train() as for any module
    assert all(module.training for module in fresh.modules())


def attention_reference(attention, layers, x):
    """nn.MultiheadAttention's math with W0 + s·B·A in place of each adapted projection."""
    weights = {name: lora_weight(layer) for name, layer in layers.items()}
    return F.multi_head_attention_forward(
        x, x, x, attention.embed_dim, attention.num_heads, weights["in_proj"], attention.in_proj_bias, None, None,
        False, 0.0, weights["out_proj"], attention.out_proj.bias, training=False, need_weights=False,
    )[0]  # fmt: skip


def adapted_attention(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.MultiheadAttention(8, 2)).eval()
    tp.inject(model, tp.LoRAConfig(target_modules=[nn.MultiheadAttention], r=2))
    randomize_adapters(model, seed=seed)
    return model


def check_attention_follows_its_weights(model, x, expected):
    """The output equals ``expected``, and so does the model after merge and after unload."""
    with torch.no_grad():
        torch.testing.assert_close(model[0](x, x, x, need_weights=False)[0], expected)
        tp.merge(model)
        torch.testing.assert_close(model[0](x, x, x, need_weights=False)[0], expected)
        tp.unload(model)
        assert type(model[0]) is nn.MultiheadAttention
        torch.testing.assert_close(model[0](x, x, x, need_weights=False)[0], expected)


def test_attention_adapters_follow_weights_loaded_with_assign():
    saved = adapted_attention(seed=0)
    x = torch.randn(4, 2, 8)
    with torch.no_grad():
        expected = attention_reference(saved[0].base_layer, saved[0].projections(), x)
    model = adapted_attention(seed=1)  # other weights, replaced by the saved ones
    model.load_state_dict({k: v.clone() for k, v in saved.state_dict().items()}, assign=True)
    check_attention_follows_its_weights(model, x, expected)


def test_attention_adapters_follow_weights_replaced_by_a_cast():
    model = adapted_attention(seed=0)
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = attention_reference(model[0].base_layer, model[0].projections(), x)
    check_attention_follows_its_weights(model, x, expected)


def test_a_refused_inject_unwraps_the_attention_it_wrapped():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Embedding(10, 8))
    state = snapshot(model)
    with pytest.raises(ValueError, match="module '1': dropout must be 0 on an nn.Embedding"):
        tp.inject(model, tp.LoRAConfig(target_modules=[nn.MultiheadAttention, nn.Embedding], dropout=0.1))
    assert type(model[0]) is nn.MultiheadAttention
    assert_unchanged(model, state)


def test_merge_and_unload_refuse_while_a_layer_has_its_adapters_disabled():
    model = two_layers()
    tp.inject(model, tp.LoRAConfig(target_modules=[nn.Linear], r=2))
    randomize_adapters(model)
    model[2].enable_adapters(False)
    x = torch.randn(3, 6)
    before, state = model(x), snapshot(model)
    for call in (tp.merge, tp.unload):
        with pytest.raises(ValueError, match="module '2': adapters are disabled: enable them before merging"):
            call(model)
        assert_unchanged(model, state)
        assert model[0].merged_adapters == [] and model[2].merged_adapters == []
        assert "default" in model.tensor_peft_configs
    with pytest.raises(ValueError, match="adapters are disabled"):
        model[2].merge()
    assert model[2].merged_adapters == []
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    tp.unload(model, merge=False)  # what the disabled model computes: its base
    torch.testing.assert_close(model(x), two_layers()(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- allocator


def snella_model(names=("a.b", "a-b")):
    torch.manual_seed(0)
    model = nn.Module()
    model.a = nn.Module()
    model.a.b = nn.Linear(6, 5)
    model.add_module("a-b", nn.Linear(6, 5))
    config = tp.SNELLAConfig(target_modules=[nn.Linear], r=2, total_steps=20, interval=1, init_sparsity=0.5,
                             target_sparsity=0.8)  # fmt: skip
    tp.inject(model, config)
    return model


def backward(model, scale=1.0):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    (scale * (model.a.b(x).square().sum() + model.get_submodule("a-b")(x).square().sum())).backward()


def test_allocator_keeps_similar_names_apart_and_skips_non_finite_steps():
    model = snella_model()
    allocator = tp.SparsityAllocator(model)
    assert len(allocator.statistics) == 2  # "a.b" and "a-b" do not collide
    backward(model)
    allocator.step()
    statistics = {k: v.clone() for k, v in allocator.state_dict().items() if k != "steps"}
    for bad in (float("inf"), float("nan")):
        model.zero_grad()
        backward(model)
        model.a.b.adapters["default"].snell_in.grad[0, 0, 0] = bad
        with pytest.warns(UserWarning, match="module 'a.b' has non-finite gradients"):
            allocator.step()
        for key, value in statistics.items():
            assert torch.equal(allocator.state_dict()[key], value), key
    model.zero_grad()
    backward(model)
    allocator.step()  # finite again: statistics move, sparsities stay valid
    assert int(allocator.steps) == 4
    assert all(0.0 <= s <= 1.0 for s in allocator.sparsities().values())
    assert not torch.equal(allocator.state_dict()["statistics.a%2Eb.importance_in"], statistics["statistics.a%2Eb.importance_in"])


def test_allocator_refuses_to_step_while_merged():
    model = snella_model()
    allocator = tp.SparsityAllocator(model)
    backward(model)
    tp.merge(model)
    sparsities, state = allocator.sparsities(), {k: v.clone() for k, v in allocator.state_dict().items()}
    with pytest.raises(ValueError, match="merged into module 'a.b': unmerge before allocator.step"):
        allocator.step()
    assert allocator.sparsities() == sparsities
    assert all(torch.equal(v, state[k]) for k, v in allocator.state_dict().items())


def test_allocator_state_of_other_layers_raises():
    model = snella_model()
    state = tp.SparsityAllocator(model).state_dict()
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(6, 5))
    tp.inject(other, tp.SNELLAConfig(target_modules=[nn.Linear], r=2))
    with pytest.raises(ValueError, match="allocator state does not fit this model's layers: missing"):
        tp.SparsityAllocator(other).load_state_dict(state)


def test_orthogonal_generators_hold_only_the_free_parameters():
    """n(n-1)/2 per block of a rotation (not n²), all of the block for gl."""
    model = tp.inject(two_layers(), tp.LieRAConfig(target_modules=["0"], group="orthogonal", block_size=3))
    assert tp.trainable_parameter_count(model) == 2 * 3
    model = tp.inject(two_layers(), tp.LieRAConfig(target_modules=["0"], group="gl", block_size=3))
    assert tp.trainable_parameter_count(model) == 2 * 9
    model = tp.inject(two_layers(), tp.LieRAConfig(target_modules=["2"], group="orthogonal", block_size=2, side="input"))
    assert tp.trainable_parameter_count(model) == 3 * 1
