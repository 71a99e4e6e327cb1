"""Every tensor_peft method against peft (LoRA, HiRA, OFT) on two small real models built
from transformers configs with random init: LLaMA-tiny (causal LM, 4 layers, width 128,
batch 8 × 64 tokens) and ViT-tiny (image classification, 64×64 images, patch 8, 4
layers, width 128, batch 16). Every method adapts the linear layers of attention and
MLP (rank 8; SNELL sparsity 0.9; SNELLA with its allocator stepping every step).

Per model and method:
- step ms: the median of several training steps (forward, backward, AdamW step, and
  SNELLA's ``allocator.step()``) after warm-up, all methods of a model interleaved step
  by step in one process, so that a change of load on the machine hits them alike;
- peak MiB: the adapter state (trainable parameters and AdamW's state, counted from
  the tensors) plus the peak memory of one training step above what the process held
  before it (activations, gradients, temporaries), measured in a fresh process per
  method: on CUDA by the allocator's peak, on CPU by the peak resident set (see
  ``benchmarks/memory.py``), the median of a few processes; and, exactly, the
  activations one forward saves for backward.

Run from the repository root: ``python -m benchmarks.real_models`` (``--help`` for
options); writes ``benchmarks/results/real-models-<machine>.{json,md}``. On a machine shared
with other work, run it with ``OMP_NUM_THREADS=1``: torch's threads spin-wait for each
other, and a busy machine makes multi-threaded step times swing by several times."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

import tensor_peft as tp
from tensor_peft.bench import default_name

from . import memory
from .conftest import interleaved_medians

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "fc1", "fc2"]
TARGET_REGEX = rf".*\.({'|'.join(TARGETS)})"  # a regex (both libraries match it whole): no name needs to exist in both models
RANK = 8
BASELINE = "peft-lora"


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1000, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (8, 64))
    return model, {"input_ids": ids, "labels": ids}


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=512, num_labels=10)  # fmt: skip
    model = ViTForImageClassification(config)
    return model, {"pixel_values": torch.randn(16, 3, 64, 64), "labels": torch.randint(0, 10, (16,))}


MODELS = {"llama-tiny": _llama, "vit-tiny": _vit}

OURS = {
    "lora": lambda: tp.LoRAConfig(target_modules=TARGET_REGEX, r=RANK, alpha=8.0),
    "mtlora": lambda: tp.MTLoRAConfig(target_modules=TARGET_REGEX, r=RANK, alpha=8.0),
    "flora": lambda: tp.FLoRAConfig(target_modules=TARGET_REGEX, r=RANK),
    "liera": lambda: tp.LieRAConfig(target_modules=TARGET_REGEX, r=RANK, alpha=8.0),
    "snell": lambda: tp.SNELLConfig(target_modules=TARGET_REGEX, r=RANK, sparsity=0.9),
    "snella": lambda: tp.SNELLAConfig(target_modules=TARGET_REGEX, r=RANK),
}


def _peft_configs() -> dict[str, Callable]:
    import peft

    return {
        "peft-lora": lambda: peft.LoraConfig(target_modules=TARGET_REGEX, r=RANK, lora_alpha=8),
        "peft-hira": lambda: peft.HiraConfig(target_modules=TARGET_REGEX, r=RANK),
        "peft-oft": lambda: peft.OFTConfig(target_modules=TARGET_REGEX, r=0, oft_block_size=RANK),
    }


METHODS = [*OURS, "peft-lora", "peft-hira", "peft-oft"]


@dataclass
class Setup:
    """A model with one method's adapters, its batch, optimizer and per-step extras."""

    model: torch.nn.Module
    batch: dict
    optimizer: torch.optim.Optimizer
    after_optimizer: list[Callable[[], None]] = field(default_factory=list)

    def step(self) -> None:
        self.model(**self.batch).loss.backward()
        self.optimizer.step()
        for extra in self.after_optimizer:
            extra()
        self.optimizer.zero_grad(set_to_none=True)

    def adapter_state_mib(self) -> float:
        """Trainable parameters and the optimizer's state, in MiB."""
        tensors = [p for p in self.model.parameters() if p.requires_grad]
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    def saved_for_backward_mib(self) -> float:
        """MiB of the distinct storages one forward saves for backward, parameters and
        buffers left out: the activations, exactly (the peak also holds temporaries)."""
        held = {t.untyped_storage().data_ptr() for t in [*self.model.parameters(), *self.model.buffers()]}
        saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in held:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            self.model(**self.batch)
        return sum(saved.values()) / 2**20

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def build(model_name: str, method: str, device: str) -> Setup:
    torch.manual_seed(0)
    model, batch = MODELS[model_name]()
    model, batch = model.to(device).train(), {k: v.to(device) for k, v in batch.items()}
    after_optimizer = []
    if method in OURS:
        tp.inject(model, OURS[method]())
        if method == "snella":
            after_optimizer.append(tp.SparsityAllocator(model).step)
    else:
        import peft

        model = peft.get_peft_model(model, _peft_configs()[method]())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return Setup(model, batch, optimizer, after_optimizer)


def memory_of(model_name: str, method: str, device: str, warmup: int = 2,
              build_setup: Callable[[str, str, str], Setup] = build) -> dict:  # fmt: skip
    """In this process: the adapter state and the peak of one training step after warm-up
    (of the setup ``build_setup`` makes: this module's ``build`` unless given)."""
    setup = build_setup(model_name, method, device)
    for _ in range(warmup):
        setup.step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        setup.step()
        torch.cuda.synchronize()
        step_peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        step_peak = memory.peak_growth_mib(setup.step)
    state = setup.adapter_state_mib()
    return {"adapter_state_mib": state, "step_peak_mib": step_peak, "peak_mib": state + step_peak,
            "saved_mib": setup.saved_for_backward_mib(), "trainable_parameters": setup.trainable_parameters()}  # fmt: skip


def memory_in_fresh_process(model_name: str, method: str, device: str) -> dict:
    root = Path(__file__).resolve().parents[1]
    code = (
        "import json, sys; from benchmarks.real_models import memory_of; "
        "print(json.dumps(memory_of(*sys.argv[1:4])))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, model_name, method, device],
        cwd=root, env={**os.environ, **memory.MMAP_THRESHOLD_ENV}, capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode:
        raise RuntimeError(f"memory of {model_name}/{method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_median(model_name: str, method: str, device: str, repeats: int) -> dict:
    """The run with the median peak of ``repeats`` fresh processes (one on CUDA, whose
    allocator peak is exact; a resident set moves by about ±0.1 MiB from run to run)."""
    runs = [memory_in_fresh_process(model_name, method, device) for _ in range(1 if device == "cuda" else repeats)]
    return sorted(runs, key=lambda run: run["peak_mib"])[len(runs) // 2]


def step_times(model_name: str, methods: list[str], device: str, repeats: int) -> dict[str, float]:
    setups = {method: build(model_name, method, device) for method in methods}
    return interleaved_medians({m: s.step for m, s in setups.items()}, device, repeats=repeats, warmup=2)


def markdown(results: dict) -> str:
    lines = [f"# tensor_peft vs peft on real models ({results['machine']}, {results['device']}, "
             f"{results['threads']} torch threads, torch {results['torch']}, peft {results['peft']})", "",
             f"Command: `{results['command']}`. Rank {RANK} everywhere; every method adapts "
             f"{', '.join(TARGETS)}. Step: forward, backward, AdamW (and SNELLA's allocator), median of "
             f"{results['repeats']} interleaved steps after 2 warm-up steps. Peak: adapter state (trainable "
             "parameters + AdamW state) + the peak of one step above what the process held before it "
             f"({results['memory_method']}). Saved for backward: the activations one forward keeps, "
             "counted exactly from the saved tensors.", ""]  # fmt: skip
    for model_name, rows in results["models"].items():
        baseline = rows[BASELINE]
        lines += [f"## {model_name}", "",
                  "| method | step ms | vs peft LoRA | peak MiB | vs peft LoRA | step peak MiB | adapter state MiB "
                  "| saved for backward MiB | trainable params |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for method, row in rows.items():
            lines.append(
                f"| {method} | {row['step_ms']:.1f} | {row['step_ms'] / baseline['step_ms']:.2f}x "
                f"| {row['peak_mib']:.1f} | {row['peak_mib'] / baseline['peak_mib']:.2f}x | {row['step_peak_mib']:.1f} "
                f"| {row['adapter_state_mib']:.2f} | {row['saved_mib']:.2f} | {row['trainable_parameters']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", help="results file suffix (default: the GPU's or this host's name)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per method (default 15: on a shared machine the median of fewer moves by several percent from run to run)")
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per method for CPU memory (default 3, the median taken)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    methods = args.methods if BASELINE in args.methods else [*args.methods, BASELINE]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not memory.available():
        print("peak memory on CPU is read from Linux's /proc: not available here", file=sys.stderr)
        return 2
    import peft

    results = {
        "machine": default_name(), "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "peft": peft.__version__,
        "command": "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
        + "python -m benchmarks.real_models" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
        "repeats": args.repeats,
        "memory_method": "CUDA allocator peak" if device == "cuda"
        else f"peak resident set, median of {args.memory_repeats} fresh processes per method",
        "models": {},
    }  # fmt: skip
    for model_name in args.models:
        times = step_times(model_name, methods, device, args.repeats)
        rows = {}
        for method in methods:
            rows[method] = {"step_ms": times[method] * 1e3, **memory_median(model_name, method, device, args.memory_repeats)}
            print(f"{model_name:11} {method:10} {rows[method]['step_ms']:8.1f} ms {rows[method]['peak_mib']:8.1f} MiB")
        results["models"][model_name] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"real-models-{args.name or results['machine']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
