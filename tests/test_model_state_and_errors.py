"""State is never half-changed and errors say what is wrong: ``delete_adapter`` refused by one
layer changes none, a save interrupted at any step leaves the old adapter or the new one,
``inject`` names every module it cannot adapt, peft import errors name the field and the
file. Sparse and padded embeddings train as the formula says, adapters run on the meta
device, and the SNELLA allocator's statistics and reported sparsities are what it uses."""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import tensor_peft as tp
from tensor_peft.allocator import sparsity_keeping
from tensor_peft.ops.sparsify import dropped_count

from .test_real_models import randomize_adapters

METHODS = {
    "lora": tp.LoRAConfig,
    "mtlora": tp.MTLoRAConfig,
    "flora": tp.FLoRAConfig,
    "liera": tp.LieRAConfig,
    "snell": tp.SNELLConfig,
    "snella": tp.SNELLAConfig,
}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def three_linears(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 4))


# --------------------------------------------------------------------------- delete_adapter


def test_delete_adapter_refused_by_one_merged_layer_changes_no_layer():
    model = three_linears()
    tp.inject(model, tp.LoRAConfig(target_modules=[nn.Linear], r=2))
    randomize_adapters(model, scale=0.3)
    model[4].merge()
    x = torch.randn(3, 6)
    before, state, configs = model(x), snapshot(model), dict(model.tensor_peft_configs)
    with pytest.raises(ValueError, match="module '4': adapter 'default' is merged: unmerge it before deleting it"):
        tp.delete_adapter(model, "default")
    assert [list(model[i].adapters) for i in (0, 2, 4)] == [["default"]] * 3
    assert [model[i].active_adapters for i in (0, 2, 4)] == [["default"]] * 3
    assert model.tensor_peft_configs == configs
    assert snapshot(model).keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in snapshot(model).items())
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    model[4].unmerge()
    tp.delete_adapter(model, "default")
    assert all(isinstance(model[i], nn.Linear) for i in (0, 2, 4)) and model.tensor_peft_configs == {}


# --------------------------------------------------------------------------- interrupted saves


class Interrupt(BaseException):
    """Stands for a KeyboardInterrupt or a kill at one step of a save."""


def _filesystem_steps(monkeypatch, interrupt_at: int) -> list[str]:
    """Make the ``interrupt_at``-th file-system call from now raise ``Interrupt``; returns
    the names of the calls made so far (every call that writes, renames or removes)."""
    calls: list[str] = []

    def counted(owner, name):
        original = getattr(owner, name)

        def call(*args, **kwargs):
            calls.append(name)
            if len(calls) == interrupt_at:
                raise Interrupt(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, call)

    for owner, name in [(os, "replace"), (os, "rename"), (os, "symlink"), (os, "unlink"), (os, "mkdir"),
                        (os, "rmdir"), (shutil, "rmtree"), (shutil, "copyfile"), (tp.model.files, "save_file"),
                        (pathlib.Path, "write_text")]:  # fmt: skip
        counted(owner, name)
    return calls


def _adapter_output(path, x):
    """The output of a fresh model with the adapter saved in ``path``."""
    return tp.load_adapter(three_linears(), path)(x).detach()


def _plain_file_bytes(path):
    return tuple((path / name).read_bytes() for name in (tp.model.CONFIG_FILE, tp.model.WEIGHTS_FILE))


def _with_plain_files(path):
    """Rewrite the adapter in ``path`` as two plain files, as peft or an earlier
    tensor_peft writes it."""
    contents = _plain_file_bytes(path)
    shutil.rmtree(path)
    path.mkdir()
    for name, content in zip((tp.model.CONFIG_FILE, tp.model.WEIGHTS_FILE), contents):
        (path / name).write_bytes(content)


@pytest.mark.parametrize("old_layout", ["saved by save_adapter", "plain files"])
def test_a_save_interrupted_at_any_step_leaves_the_old_adapter_or_the_new_one(tmp_path, monkeypatch, old_layout):
    """The old and new adapters differ in alpha and in their tensors: a directory holding
    the config of one and the tensors of the other loads as neither."""
    x = torch.randn(4, 6)
    old, new = three_linears(), three_linears()
    tp.inject(old, tp.LoRAConfig(target_modules=[nn.Linear], r=2, alpha=2.0))
    tp.inject(new, tp.LoRAConfig(target_modules=[nn.Linear], r=2, alpha=7.0))
    randomize_adapters(old, seed=1, scale=0.3)
    randomize_adapters(new, seed=2, scale=0.3)
    files = {}  # the bytes of each adapter's two files, as a reader of the plain file names sees them
    for name, model in (("old", old), ("new", new)):
        tp.save_adapter(model, tmp_path / name)
        files[name] = _plain_file_bytes(tmp_path / name)
    seen = set()
    for step in itertools.count(1):
        path = tmp_path / str(step)
        tp.save_adapter(old, path)
        if old_layout == "plain files":
            _with_plain_files(path)
        (path / "notes.txt").write_text("the user's own file")
        with monkeypatch.context() as patch:
            calls = _filesystem_steps(patch, interrupt_at=step)
            try:
                tp.save_adapter(new, path)
                interrupted = None
            except Interrupt as interrupt:
                interrupted = str(interrupt)
        expected = {"old": old(x).detach(), "new": new(x).detach()}
        output = _adapter_output(path, x)
        found = [name for name, value in expected.items() if torch.equal(output, value)]
        assert found, f"interrupted at call {step} ({interrupted}): the directory holds neither adapter"
        seen.add(found[0])
        assert _plain_file_bytes(path) in files.values(), f"interrupted at call {step}: peft would read a mix"
        assert (path / "notes.txt").read_text() == "the user's own file"
        if interrupted is None:
            assert found == ["new"] and len(calls) > 3
            break
    assert seen == {"old", "new"}


def test_a_saved_adapter_reads_through_the_plain_file_names(tmp_path):
    """Other readers (peft, a user's editor) find the files under their usual names."""
    model = three_linears()
    tp.inject(model, tp.LoRAConfig(target_modules=["0"], r=2, alpha=3.0))
    tp.save_adapter(model, tmp_path)
    tp.save_adapter(model, tmp_path)  # a second save replaces the first
    saved = json.loads((tmp_path / tp.model.CONFIG_FILE).read_text())
    assert saved["config"]["alpha"] == 3.0
    names = {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")}
    assert names == {tp.model.CONFIG_FILE, tp.model.WEIGHTS_FILE}
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".")]) == 2  # the current adapter and its link


# --------------------------------------------------------------------------- embeddings


def test_lora_on_a_sparse_embedding_trains_by_the_formula():
    """The frozen weight of an ``nn.Embedding(sparse=True)`` takes no gradient; the
    adapter's parameters take their dense ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 5, sparse=True))
    tp.inject(model, tp.LoRAConfig(target_modules=["0"], r=2, alpha=3.0))
    randomize_adapters(model, scale=0.3)
    layer, ids = model[0], torch.tensor([[1, 4, 4], [11, 0, 4]])
    adapter = layer.adapters["default"]
    A, B = adapter.lora_A.detach().clone().requires_grad_(), adapter.lora_B.detach().clone().requires_grad_()
    expected = F.embedding(ids, layer.base_layer.weight + 1.5 * (B @ A).T)
    out = model(ids)
    torch.testing.assert_close(out, expected)
    weights = torch.randn(out.shape)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(adapter.lora_A.grad, A.grad)
    torch.testing.assert_close(adapter.lora_B.grad, B.grad)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_a_sparse_embedding_trains_as_on_a_dense_one(method):
    models = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        models[sparse] = nn.Sequential(nn.Embedding(12, 6, padding_idx=0, sparse=sparse))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ranks clipped to the embedding's shape
            tp.inject(models[sparse], METHODS[method](target_modules=["0"], r=2))
        randomize_adapters(models[sparse], scale=0.3)
    ids = torch.tensor([[1, 4, 0], [11, 0, 4]])
    outputs = {sparse: model(ids) for sparse, model in models.items()}
    torch.testing.assert_close(outputs[True], outputs[False], rtol=0, atol=0)
    weights = torch.randn(outputs[True].shape)
    for out in outputs.values():
        (out * weights).sum().backward()
    grads = {sparse: {n: p.grad for n, p in model.named_parameters() if p.requires_grad} for sparse, model in models.items()}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[True].items():
        assert not grad.is_sparse
        torch.testing.assert_close(grad, grads[False][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method,options", [
    ("snell", {"sparsity": 0.5}), ("snella", {"init_sparsity": 0.5}), ("liera", {"side": "input"}),
])  # fmt: skip
def test_embeddings_looked_up_whole_train_the_padding_row_as_lora_does(method, options):
    """Positions that look up ``padding_idx`` send their gradient to the update, as LoRA's
    lookup does to B (peft's rule): the padding row moves. SNELL and LieRA's input side
    look up rows of the whole effective weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6, padding_idx=0))
    with torch.no_grad():
        model[0].weight[0] = torch.randn(6)  # a padding row that is not zero, as a pretrained model's may be
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ranks clipped to the embedding's shape
        tp.inject(model, METHODS[method](target_modules=["0"], r=2, **options))
    randomize_adapters(model, scale=0.3)
    layer, ids = model[0], torch.tensor([[0, 0, 3], [0, 5, 5]])
    adapter = layer.adapters["default"]
    trainable = [p for p in layer.parameters() if p.requires_grad]
    expected = F.embedding(ids, layer.merge_weight(adapter, layer.weight).T)  # no padding_idx: every row trains
    expected_grads = torch.autograd.grad(expected.square().sum(), trainable)
    out = model(ids)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), trainable)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    padding_only = torch.autograd.grad(model(torch.zeros(1, 2, dtype=torch.long)).square().sum(), trainable)
    assert any(grad.abs().sum() > 0 for grad in padding_only)


# --------------------------------------------------------------------------- meta device


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make_layer,shape", [(lambda: nn.Linear(8, 6), (3, 8)), (lambda: nn.Conv2d(3, 4, 3), (2, 3, 7, 7))])
def test_adapters_run_forward_and_backward_on_the_meta_device(method, make_layer, shape):
    """As ``init_empty_weights`` and FSDP's deferred init use them: shapes only."""
    with torch.device("meta"):
        model = nn.Sequential(make_layer())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ranks clipped to the layer's shape
        tp.inject(model, METHODS[method](target_modules=["0"], r=2))
    x = torch.empty(shape, device="meta")
    expected = model[0].base_layer(x)
    out = model(x)
    assert out.device.type == "meta" and out.shape == expected.shape
    out.sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- inject errors


def test_inject_names_every_module_it_cannot_adapt():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))
    state = snapshot(model)
    with pytest.raises(ValueError) as error:
        tp.inject(model, tp.LoRAConfig(target_modules=["0", "1", "2"]))
    message = str(error.value)
    assert "module '1': " in message and "got LayerNorm" in message
    assert "module '2': " in message and "got BatchNorm1d" in message
    assert "module '0'" not in message
    assert isinstance(model[0], nn.Linear) and not hasattr(model, "tensor_peft_configs")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- peft import errors


def _peft_adapter(path, **fields):
    """A peft LoRA adapter of ``three_linears``'s first layer, with config ``fields`` changed."""
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["0"], "lora_dropout": 0.0, **fields}
    path.mkdir(exist_ok=True)
    (path / tp.model.CONFIG_FILE).write_text(json.dumps(config))
    save_file({"base_model.model.0.lora_A.weight": torch.randn(2, 6), "base_model.model.0.lora_B.weight": torch.randn(6, 2)},
              str(path / tp.model.WEIGHTS_FILE))  # fmt: skip


@pytest.mark.parametrize("fields,message", [
    ({"lora_alpha": "eight"}, r"adapter_config.json: lora_alpha must be a number, got 'eight'"),
    ({"alpha_pattern": {"0": "eight"}}, r"adapter_config.json: alpha_pattern\['0'\] must be a number, got 'eight'"),
    ({"lora_dropout": "none"}, r"adapter_config.json: lora_dropout must be a number, got 'none'"),
    ({"lora_alpha": True}, r"adapter_config.json: lora_alpha must be a number, got True"),
])  # fmt: skip
def test_a_peft_config_field_that_is_not_a_number_is_named(tmp_path, fields, message):
    _peft_adapter(tmp_path, **fields)
    model = three_linears()
    with pytest.raises(ValueError, match=message):
        tp.load_adapter(model, tmp_path)
    assert not hasattr(model, "tensor_peft_configs") and isinstance(model[0], nn.Linear)


def test_a_peft_adapter_without_tensors_says_so(tmp_path):
    _peft_adapter(tmp_path)
    save_file({}, str(tmp_path / tp.model.WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors holds no LoRA tensors"):
        tp.load_adapter(three_linears(), tmp_path)


# --------------------------------------------------------------------------- allocator


@pytest.mark.parametrize("threshold", ["count", "quantile"])
def test_reported_sparsities_read_back_as_the_kept_count(threshold):
    """For every kept count k of N entries, the sparsity s the allocator reports drops
    exactly N − k entries by the layer's rule, and reads as k kept: it is the float
    nearest (N − k)/N that does."""
    for size in range(1, 121):
        for kept in range(size + 1 if threshold == "count" else size):  # quantile drops at least one
            sparsity = sparsity_keeping(kept, size, lambda s: dropped_count(s, size, threshold))
            assert dropped_count(sparsity, size, threshold) == size - kept, (kept, size)
            assert math.isclose(sparsity, (size - kept) / size, rel_tol=0, abs_tol=2.0**-52), (kept, size, sparsity)
    sparsity = sparsity_keeping(2, 192)
    assert round((1 - sparsity) * 192) == 2 and f"{sparsity:.5f}" == f"{190 / 192:.5f}"


def _snella_model(dtype=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    config = tp.SNELLAConfig(target_modules=[nn.Linear], r=2, total_steps=20, interval=1, init_sparsity=0.5,
                             target_sparsity=0.8, dtype=dtype)  # fmt: skip
    return tp.inject(model, config)


def _fill_with_gradient(model: nn.Module, embedding: torch.Tensor, value: float) -> None:
    """Every trainable parameter's gradient set to ones, then ``embedding`` and its gradient to ``value``."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.grad = torch.ones_like(parameter)
        embedding.fill_(value)
        embedding.grad.fill_(value)


def test_allocator_statistics_of_half_embeddings_are_taken_in_float32():
    """|θ·g| of float16 embeddings overflows float16 but not float32: the step counts."""
    model = _snella_model("float16")
    allocator = tp.SparsityAllocator(model)
    _fill_with_gradient(model, model[0].adapters["default"].snell_in, 300.0)  # 300·300 > float16's largest, 65504
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        allocator.step()
    importance = allocator.statistics["0"].importance_in
    torch.testing.assert_close(importance, torch.full_like(importance, (1 - allocator.config.beta1) * 90000.0))


def test_allocator_says_when_finite_gradients_overflow_the_statistics():
    model = _snella_model()
    allocator = tp.SparsityAllocator(model)
    _fill_with_gradient(model, model[1].adapters["default"].snell_out, 1e20)  # finite; their product is not, in float32
    state = {k: v.clone() for k, v in allocator.state_dict().items() if k != "steps"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        allocator.step()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "non-finite gradients" not in messages[0]
    assert "module '1': |embedding · gradient| overflows float32" in messages[0]
    assert all(torch.equal(allocator.state_dict()[k], v) for k, v in state.items())
