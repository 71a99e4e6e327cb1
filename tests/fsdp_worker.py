"""One rank of the FSDP2 test (tests/test_real_models.py): shards a small model with
adapters by ``fully_shard`` (gloo), takes one SGD step on this rank's batch, and saves the
full adapter parameters."""

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import tensor_peft as tp

CONFIGS = {
    "lora": lambda: tp.LoRAConfig(target_modules=[nn.Linear], r=2),
    "mtlora": lambda: tp.MTLoRAConfig(target_modules=[nn.Linear], r=2, variant="ctcm"),
    "flora": lambda: tp.FLoRAConfig(target_modules=[nn.Linear], r=2, execution="merged"),
    "liera": lambda: tp.LieRAConfig(target_modules=[nn.Linear], r=2),
    "liera-orthogonal": lambda: tp.LieRAConfig(target_modules=[nn.Linear], group="orthogonal", block_size=2),
    "snell": lambda: tp.SNELLConfig(target_modules=[nn.Linear], r=2),
    "snella": lambda: tp.SNELLAConfig(target_modules=[nn.Linear], r=2),
}


def model_for(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4))
    tp.inject(model, CONFIGS[method]())
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def batch(rank: int) -> torch.Tensor:
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(10 + rank))


def step(model: nn.Module, x: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).square().sum().backward()
    optimizer.step()


def sharded_step(method: str, rank: int, per_layer: bool) -> dict[str, torch.Tensor]:
    """The full adapter parameters after one step, the model sharded per adapter layer
    and at the root (``per_layer``) or at the root only."""
    model = model_for(method)
    if per_layer:
        for layer in model:
            if isinstance(layer, tp.nn.AdapterLayer):
                fully_shard(layer)
    fully_shard(model)
    step(model, batch(rank))
    return {n: p.full_tensor() for n, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    rank, rendezvous, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    results = {(m, per_layer): sharded_step(m, rank, per_layer) for m in CONFIGS for per_layer in (True, False)}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # both ranks done with every collective before the group is torn down
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: a gloo thread still being destroyed then
    # aborts the process now and then ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
