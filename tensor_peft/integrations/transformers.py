"""``AdapterTrainer``: a drop-in ``transformers.Trainer`` for a model with tensor_peft
adapters. Its checkpoints hold the adapter (and its ``modules_to_save``) in
``save_adapter``'s format, the SNELLA allocator's state, and the trainer's own state
(optimizer, scheduler, RNG), not the frozen base model; ``resume_from_checkpoint``
continues exactly. With a SNELLA adapter, the allocator steps after every optimizer step.

Needs transformers (not a dependency of tensor_peft)."""

from __future__ import annotations

import os

import torch
import transformers

from ..allocator import SparsityAllocator
from ..config import SNELLAConfig
from ..model import load_adapter_weights, save_adapter, set_adapter

ALLOCATOR_FILE = "allocator.pt"


class _AllocatorStep(transformers.TrainerCallback):
    """Steps the allocator after each optimizer step (the gradients are still there)."""

    def __init__(self, allocator: SparsityAllocator):
        self.allocator = allocator

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.allocator.step()


class AdapterTrainer(transformers.Trainer):
    """``transformers.Trainer`` for adapter ``adapter_name`` of ``model`` (the model's only
    adapter by default), which it makes the active adapter (``set_adapter``), so that it
    is the one trained, saved and resumed; every other argument is the Trainer's."""

    def __init__(self, model=None, *args, adapter_name: str | None = None, **kwargs):
        configs = getattr(model, "tensor_peft_configs", {})
        if adapter_name is None and len(configs) == 1:
            adapter_name = next(iter(configs))
        if adapter_name not in configs:
            raise ValueError(f"adapter_name must name one of the model's adapters {sorted(configs)}, got {adapter_name!r}")
        set_adapter(model, adapter_name)
        self.adapter_name = adapter_name
        self.allocator = SparsityAllocator(model, adapter_name) if isinstance(configs[adapter_name], SNELLAConfig) else None
        super().__init__(model, *args, **kwargs)
        if self.allocator is not None:
            self.add_callback(_AllocatorStep(self.allocator))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_adapter(self.accelerator.unwrap_model(self.model), output_dir, self.adapter_name)
        if self.allocator is not None:
            torch.save(self.allocator.state_dict(), os.path.join(output_dir, ALLOCATOR_FILE))
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        load_adapter_weights(model, resume_from_checkpoint, self.adapter_name)
        if self.allocator is not None:
            state = torch.load(os.path.join(resume_from_checkpoint, ALLOCATOR_FILE), weights_only=True)
            self.allocator.load_state_dict(state)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
