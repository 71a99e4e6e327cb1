"""The model-level API: inject (targets, exclusions, freezing), merge / unmerge / unload,
save -> load in a fresh process, load errors that name the module, several adapters,
parity with peft's LoRA, torch.compile, and DistributedDataParallel (gloo, 2 processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import tensor_peft as tp
from tensor_peft.nn import LoRALayer


class SmallNet(nn.Module):
    """Conv + linear layers with nested names, like a small CNN."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, padding="same"), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(
            OrderedDict(flatten=nn.Flatten(), fc1=nn.Linear(32, 16), act=nn.ReLU(), fc2=nn.Linear(16, 4))
        )

    def forward(self, x):
        return self.head(self.pool(self.features(x)))


def small_net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return SmallNet().to(dtype)


def inputs(seed=1, dtype=torch.float64):
    return torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(seed)).to(dtype)


def randomize(model, scale=0.2, seed=2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


@pytest.mark.parametrize(
    "targets,expected",
    [
        (["features.0", "head.fc1"], {"features.0", "head.fc1"}),
        (["features.0", "fc2"], {"features.0", "head.fc2"}),  # dotted suffix
        (r"head\.fc\d", {"head.fc1", "head.fc2"}),  # regex, full match
        ([nn.Conv2d], {"features.0", "features.2"}),
        (nn.Linear, {"head.fc1", "head.fc2"}),
    ],
)
def test_inject_targets_freezes_and_keeps_the_output(targets, expected):
    model, x = small_net(), inputs()
    before = model(x)
    tp.inject(model, tp.LoRAConfig(target_modules=targets, r=2))
    adapted = {name for name, m in model.named_modules() if isinstance(m, LoRALayer)}
    assert adapted == expected
    assert torch.equal(model(x), before)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in name for name in trainable)
    assert tp.trainable_parameter_count(model) == sum(
        p.numel() for n, p in model.named_parameters() if ".adapters." in n
    )


def test_exclude_and_target_errors():
    model = small_net()
    tp.inject(model, tp.LoRAConfig(target_modules=[nn.Conv2d, nn.Linear], exclude_modules=["head.fc2"], r=2))
    assert not isinstance(model.head.fc2, LoRALayer) and isinstance(model.head.fc1, LoRALayer)
    with pytest.raises(ValueError, match="matched no module"), pytest.warns(UserWarning, match="'nothing' matches no"):
        tp.inject(small_net(), tp.LoRAConfig(target_modules=["nothing"]))
    with pytest.raises(ValueError, match="module 'pool': adapters wrap .* got AdaptiveAvgPool2d"):
        tp.inject(small_net(), tp.LoRAConfig(target_modules=["pool"]))
    with pytest.raises(ValueError, match="module 'head.fc1' already holds lora adapters"):
        tp.inject(model, tp.MTLoRAConfig(target_modules=["head.fc1"]), "other")
    with pytest.raises(ValueError, match="target_modules must name"):
        tp.LoRAConfig()
    with pytest.raises(TypeError, match=r"config must be an adapter config \(LoRAConfig, .*got dict"):
        tp.inject(small_net(), {"target_modules": ["head.fc1"]})


@pytest.mark.parametrize("config", [tp.LoRAConfig(target_modules=[nn.Conv2d, nn.Linear], r=3, alpha=6.0),
                                    tp.MTLoRAConfig(target_modules=[nn.Conv2d, nn.Linear], r=3, variant="icfm"),
                                    tp.FLoRAConfig(target_modules=[nn.Conv2d, nn.Linear], r=3, scale=0.5),
                                    tp.LieRAConfig(target_modules=[nn.Conv2d, nn.Linear], r=2, alpha=1.0),
                                    tp.LieRAConfig(target_modules=[nn.Conv2d, nn.Linear], group="orthogonal", block_size=4),
                                    tp.SNELLConfig(target_modules=[nn.Conv2d, nn.Linear], r=2, kernel="rbf", mode="soft"),
                                    tp.SNELLAConfig(target_modules=[nn.Conv2d, nn.Linear], r=4, init_sparsity=0.3)])  # fmt: skip
def test_merge_unmerge_unload(config):
    model, x = small_net(), inputs()
    base_out = model(x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    tp.inject(model, config)
    randomize(model)
    adapted_out = model(x)
    tp.merge(model)
    torch.testing.assert_close(model(x), adapted_out, rtol=1e-12, atol=1e-13)
    tp.unmerge(model)
    for name, layer in tp.model.adapter_layers(model).items():
        torch.testing.assert_close(layer.weight, weights[f"{name}.weight"], rtol=1e-14, atol=1e-15)
    merged = tp.unload(model, merge=True)
    assert not tp.model.adapter_layers(merged) and not hasattr(merged, "tensor_peft_configs")
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in merged.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    torch.testing.assert_close(merged(x), adapted_out, rtol=1e-12, atol=1e-13)
    plain = small_net()
    tp.inject(plain, config)
    randomize(plain)
    torch.testing.assert_close(tp.unload(plain, merge=False)(x), base_out, rtol=0, atol=0)


def test_several_named_adapters():
    model, x = small_net(), inputs()
    base_out = model(x)
    tp.inject(model, tp.LoRAConfig(target_modules=["head.fc1"], r=2), "first")
    randomize(model, seed=3)
    first_out = model(x)
    tp.inject(model, tp.MTLoRAConfig(target_modules=["features.0"], r=2, variant="dtsm"), "second")
    randomize(model, seed=4)
    second_out = model(x)
    assert not torch.allclose(first_out, second_out)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.second." in n for n in trainable)
    tp.set_adapter(model, "first")
    torch.testing.assert_close(model(x), first_out)
    tp.delete_adapter(model, "first")
    assert not isinstance(model.head.fc1, LoRALayer)
    torch.testing.assert_close(model(x), base_out)
    tp.set_adapter(model, "second")
    torch.testing.assert_close(model(x), second_out)
    with pytest.raises(ValueError, match="no adapter named 'first'"):
        tp.set_adapter(model, "first")


LOAD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import tensor_peft as tp
    from tests.test_model import small_net, inputs
    model = tp.load_adapter(small_net(), sys.argv[1], "restored").eval()
    torch.save(model(inputs()), sys.argv[2])
    """
)


@pytest.mark.parametrize("config", [
    tp.MTLoRAConfig(target_modules=[nn.Conv2d, nn.Linear], r=3, variant="ctcm", dropout=0.1),
    tp.FLoRAConfig(target_modules=[nn.Conv2d, nn.Linear], ranks=[3, 2, 2, 1], exclude_modules=["head.fc1", "head.fc2"]),
    tp.LieRAConfig(target_modules=[nn.Conv2d, nn.Linear], group="gl", block_size=2),
    tp.SNELLAConfig(target_modules=[nn.Conv2d, nn.Linear], r=2, learnable_coeff=True),
])  # fmt: skip
def test_save_then_load_in_a_fresh_process_reproduces_outputs(tmp_path, config, monkeypatch):
    monkeypatch.setenv("TENSOR_PEFT_FLORA_AUTOTUNE", "0")  # FLoRA auto: the same path in both processes
    monkeypatch.setattr("tensor_peft.nn.flora.AUTOTUNE", False)
    model, x = small_net(), inputs()
    tp.inject(model, config)
    randomize(model)
    for layer in tp.model.adapter_layers(model).values():
        if hasattr(layer.adapters["default"], "sparsity"):  # SNELLA's allocator moved it
            layer.adapters["default"].sparsity = 0.55
    model.eval()
    expected = model(x)
    tp.save_adapter(model, tmp_path / "adapter")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "adapter"), str(tmp_path / "out.pt")],
        check=True, cwd=root, timeout=120,
    )  # fmt: skip
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)


class WiderNet(SmallNet):
    def __init__(self):
        super().__init__()
        self.head.fc1 = nn.Linear(32, 20)
        self.head.fc2 = nn.Linear(20, 4)


def test_load_errors_name_the_module_and_leave_the_model_as_it_was(tmp_path):
    model = small_net()
    tp.inject(model, tp.LoRAConfig(target_modules=["head.fc1", "head.fc2"], r=2))
    tp.save_adapter(model, tmp_path / "a")
    wider = WiderNet().double()
    flags = {n: p.requires_grad for n, p in wider.named_parameters()}
    with pytest.raises(ValueError, match=r"module 'head.fc1': saved lora_B has shape \(16, 2\), the model's has \(20, 2\)"):
        tp.load_adapter(wider, tmp_path / "a")
    assert not tp.model.adapter_layers(wider) and not getattr(wider, "tensor_peft_configs", {})
    assert flags == {n: p.requires_grad for n, p in wider.named_parameters()}
    other = small_net()
    tp.inject(other, tp.MTLoRAConfig(target_modules=["head.fc1"]), "x")
    with pytest.raises(ValueError, match="module 'head.fc1' already holds mtlora adapters"):
        tp.load_adapter(other, tmp_path / "a")
    missing = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="module 'head.fc1', which the model lacks"):
        tp.load_adapter(missing, tmp_path / "a")


def test_a_flora_config_saved_with_mode_loads_it_as_execution(tmp_path):
    """Adapters saved while FLoRA's ``execution`` was called ``mode`` still load; a config
    that gives both is refused."""
    model, x = small_net(), inputs()
    tp.inject(model, tp.FLoRAConfig(target_modules=["head.fc1", "head.fc2"], r=2, execution="factorized"))
    randomize(model)
    expected = model.eval()(x)
    tp.save_adapter(model, tmp_path / "a")
    file = tmp_path / "a" / tp.model.CONFIG_FILE
    saved = json.loads(file.read_text())
    saved["config"]["mode"] = saved["config"].pop("execution")
    file.write_text(json.dumps(saved))
    restored = tp.load_adapter(small_net(), tmp_path / "a").eval()
    assert restored.tensor_peft_configs["default"].execution == "factorized"
    assert restored.head.fc1.adapters["default"].execution == "factorized"
    torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
    saved["config"]["execution"] = "merged"
    file.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="gives both 'execution' and 'mode'"):
        tp.load_adapter(small_net(), tmp_path / "a")


def test_flora_config_takes_mode_as_execution_with_a_deprecation_warning():
    """Code written for 0.1 (``FLoRAConfig(mode=...)``) keeps working for one minor version,
    warned with the new name; giving both names is refused; the new name does not warn."""
    with pytest.warns(DeprecationWarning, match=r"FLoRAConfig\(mode=\.\.\.\) is deprecated .*use execution="):
        config = tp.FLoRAConfig(target_modules=["head.fc1"], mode="factorized")
    assert config.execution == "factorized"
    assert config == tp.FLoRAConfig(target_modules=["head.fc1"], execution="factorized")
    with pytest.raises(ValueError, match="FLoRAConfig gives both 'execution' and 'mode'"):
        tp.FLoRAConfig(target_modules=["head.fc1"], mode="merged", execution="merged")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tp.FLoRAConfig(target_modules=["head.fc1"], execution="merged")


@pytest.mark.parametrize("r,alpha", [(4, 8.0), (3, 3.0)])
def test_lora_matches_peft(r, alpha):
    """Same init distribution and, for the same weights, the same outputs as peft's LoRA."""
    peft = pytest.importorskip("peft", reason="peft parity needs peft installed")
    targets = ["features.0", "head.fc1", "head.fc2"]
    ours, x = small_net(), inputs()
    theirs = peft.get_peft_model(
        small_net(), peft.LoraConfig(target_modules=targets, r=r, lora_alpha=alpha, lora_dropout=0.0)
    )
    tp.inject(ours, tp.LoRAConfig(target_modules=targets, r=r, alpha=alpha))
    for name in targets:
        layer, peft_layer = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        adapter = layer.adapters["default"]
        peft_A, peft_B = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        assert adapter.lora_A.shape == peft_A.shape and adapter.lora_B.numel() == peft_B.numel()
        assert adapter.scale == peft_layer.scaling["default"]
        bound = 1 / adapter.lora_A[0].numel() ** 0.5  # kaiming_uniform(a=√5) bound
        for A in (adapter.lora_A, peft_A):  # both fill the whole uniform range
            assert 0.8 * bound <= A.abs().max() <= bound
        assert not adapter.lora_B.any() and not peft_B.any()
        with torch.no_grad():  # the same random weights on both sides
            peft_B.normal_()
            adapter.lora_A.copy_(peft_A)
            adapter.lora_B.copy_(peft_B.reshape(adapter.lora_B.shape))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", [
    tp.MTLoRAConfig(target_modules=[nn.Conv2d, nn.Linear], r=2, variant="icfm"),
    tp.SNELLConfig(target_modules=[nn.Conv2d, nn.Linear], r=2, sparsity=0.7),
    tp.LieRAConfig(target_modules=[nn.Conv2d, nn.Linear], r=2),  # a Linear runs ops.hadamard_linear
])  # fmt: skip
def test_compiled_forward_and_backward_equal_eager(config):
    torch._dynamo.reset()
    model, x = small_net(dtype=torch.float32), inputs(dtype=torch.float32)
    tp.inject(model, config)
    randomize(model)
    compiled = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), params)
    compiled_out = compiled(x)
    compiled_grads = torch.autograd.grad(compiled_out.square().sum(), params)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    import tensor_peft as tp
    from torch.nn.parallel import DistributedDataParallel
    from tests.test_model import small_net, inputs
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method="file://" + sys.argv[2])
    model = tp.inject(small_net(), tp.LoRAConfig(target_modules=["features.0", "head.fc1"], r=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(0.05)
    ddp = DistributedDataParallel(model)
    ddp(inputs(seed=10 + rank)).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save(grads, sys.argv[3] + f".{rank}")
    dist.destroy_process_group()
    """
)


def test_distributed_data_parallel_synchronizes_adapter_gradients(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = [str(tmp_path / "rendezvous"), str(tmp_path / "grads")]
    procs = [subprocess.Popen([sys.executable, "-c", DDP_SCRIPT, str(rank), *args], cwd=root) for rank in (0, 1)]
    assert all(p.wait(timeout=180) == 0 for p in procs)
    grads = [torch.load(tmp_path / f"grads.{rank}") for rank in (0, 1)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(".adapters.default." in name for name in grads[0])
    # the average of the two ranks' single-process gradients
    model = tp.inject(small_net(), tp.LoRAConfig(target_modules=["features.0", "head.fc1"], r=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(0.05)
    expected = {}
    for rank in (0, 1):
        model.zero_grad()
        model(inputs(seed=10 + rank)).square().sum().backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                expected[name] = expected.get(name, 0) + p.grad / 2
    for name in expected:
        torch.testing.assert_close(grads[0][name], expected[name])
        torch.testing.assert_close(grads[1][name], expected[name])


@pytest.mark.parametrize(
    "make_config,message",
    [
        (lambda: tp.LoRAConfig(target_modules=["fc"], r=0), "r must be a positive integer"),
        (lambda: tp.LoRAConfig(target_modules=["fc"], dropout=-0.1), "dropout must be a probability"),
        (lambda: tp.LoRAConfig(target_modules=["fc"], dtype="float8"), "dtype must name a floating torch dtype"),
        (lambda: tp.LoRAConfig(target_modules=[]), "target_modules must name"),
        (lambda: tp.MTLoRAConfig(target_modules=["fc"], variant="full"), "variant must be one of"),
        (lambda: tp.FLoRAConfig(target_modules=["fc"], execution="fused"), "execution must be one of"),
        (lambda: tp.LieRAConfig(target_modules=["fc"], group="unitary"), "group must be one of"),
        (lambda: tp.LieRAConfig(target_modules=["fc"], exp="pade"), "exp must be one of"),
        (lambda: tp.LieRAConfig(target_modules=["fc"], block_size=0), "block_size must be a positive integer"),
        (lambda: tp.FLoRAConfig(target_modules=["fc"], ranks=[4, 0]), "ranks must be a positive integer"),
    ],
)
def test_bad_config_values_raise_naming_the_field(make_config, message):
    with pytest.raises(ValueError, match=message):
        make_config()


def test_config_dtype_sets_the_adapter_dtype():
    model = tp.inject(small_net(dtype=torch.float32), tp.LoRAConfig(target_modules=["fc1"], dtype="float64"))
    assert model.head.fc1.adapters["default"].lora_A.dtype == torch.float64
    assert model(inputs(dtype=torch.float32)).dtype == torch.float32
