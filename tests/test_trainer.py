"""AdapterTrainer: a transformers Trainer whose checkpoints hold only the adapter, that
resumes exactly, and that steps SNELLA's allocator by itself."""

from __future__ import annotations

import os

import pytest
import torch

import tensor_peft as tp

transformers = pytest.importorskip("transformers")
from tensor_peft.integrations.transformers import AdapterTrainer  # noqa: E402


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(7))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer(model, out, max_steps, adapter_name=None):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, dataloader_num_workers=0, logging_steps=100, seed=3, save_only_model=False,
    )  # fmt: skip
    return AdapterTrainer(model, args, train_dataset=Tokens(), adapter_name=adapter_name)


CONFIGS = {
    "lora": lambda: tp.LoRAConfig(target_modules="all-linear", r=2),
    "snella": lambda: tp.SNELLAConfig(target_modules="all-linear", r=2, total_steps=4, interval=1),
}


@pytest.mark.parametrize("method", CONFIGS)
def test_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path, method):
    model = tp.inject(tiny_llama(), CONFIGS[method]())
    run = trainer(model, tmp_path / "run", 4)
    run.train()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    adapter_bytes = os.path.getsize(checkpoint / "adapter_model.safetensors")
    assert adapter_bytes < 0.2 * sum(p.numel() * 4 for p in tiny_llama().parameters())
    if method == "snella":
        assert "allocator.pt" in files
        assert len(set(run.allocator.sparsities().values())) > 1  # reallocated during training

    resumed_model = tp.inject(tiny_llama(), CONFIGS[method]())
    resumed = trainer(resumed_model, tmp_path / "resumed", 4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in resumed_model.named_parameters():
        if value.requires_grad:
            torch.testing.assert_close(value, trained[name], rtol=1e-6, atol=1e-7, msg=name)
    if method == "snella":
        assert resumed.allocator.sparsities() == run.allocator.sparsities()


def test_adapter_name_must_exist():
    model = tp.inject(tiny_llama(), CONFIGS["lora"]())
    with pytest.raises(ValueError, match="adapter_name must name one of the model's adapters"):
        AdapterTrainer(model, transformers.TrainingArguments(output_dir="unused", use_cpu=True, report_to=[]),
                       adapter_name="other")  # fmt: skip


def test_the_named_adapter_is_trained_and_saved_though_another_was_active(tmp_path):
    model = tp.inject(tiny_llama(), CONFIGS["lora"](), "a")
    tp.inject(model, CONFIGS["lora"](), "b")  # active now
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if ".adapters." in name}
    trainer(model, tmp_path, 2, adapter_name="a").train()
    changed = {name for name, p in model.named_parameters() if name in initial and not torch.equal(p, initial[name])}
    assert changed == {name for name in initial if ".adapters.a." in name}
    saved = tp.load_adapter(tiny_llama(), tmp_path / "checkpoint-2", "a")
    trained = {name: p for name, p in model.named_parameters() if ".adapters.a." in name}
    assert trained.keys() == {name for name, _ in saved.named_parameters() if ".adapters.a." in name}
    for name, value in saved.named_parameters():
        if name in trained:
            assert torch.equal(value, trained[name]), name
