"""SNELL / SNELLA beyond the shared layer conformance: nothing of the weight's size is
kept for backward, the sparsity survives dtype casts and save/load, and the
SNELLA allocator: the paper's cubic budget schedule and split on worked examples, its importance
statistics against the formulas, and an exact resume from saved state."""

from __future__ import annotations

import copy
import gc

import pytest
import safetensors.torch
import torch
from torch import nn

import tensor_peft as tp
from tensor_peft.allocator import distribute, sparsity_keeping
from tensor_peft import ops
from tensor_peft.nn import SNELLLayer
from tensor_peft.nn.snell import SNELLAdapter
from tensor_peft.ops.kernelized_delta import KERNEL_PARAMS
from tensor_peft.ops.sparsify import dropped_count


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_nothing_of_the_weights_size_is_kept_for_backward(monkeypatch, kind):
    """A Linear runs as one op (sparse_linear) that rebuilds W0 + ΔW in backward by itself;
    a conv rebuilds its effective weight in backward from the forward's τ (no second
    selection). Either way the gradients are those through the merged weight."""
    calls = []  # (threshold given, threshold returned) of each ΔW the adapter computes
    original = SNELLAdapter.delta

    def recorded(self, dtype, threshold=None):
        delta, tau = original(self, dtype, threshold)
        calls.append((threshold, tau))
        return delta, tau

    monkeypatch.setattr(SNELLAdapter, "delta", recorded)
    base, input_shape = (nn.Linear(12, 10), (3, 2, 12)) if kind == "linear" else (nn.Conv1d(4, 10, 3), (3, 4, 9))
    layer = SNELLLayer(base.double(), r=4, sparsity=0.5)
    adapter = layer.adapters["default"]
    x = torch.randn(*input_shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    gc.collect()  # nothing of the weight's size is alive besides the weight itself
    shapes = {layer.weight.shape, torch.Size([10, layer.weight[0].numel()])}
    alive = [t for t in gc.get_objects() if issubclass(type(t), torch.Tensor) and t.shape in shapes]
    assert len(alive) == 1 and alive[0] is layer.weight
    inputs = [x, adapter.snell_out, adapter.snell_in]
    got = torch.autograd.grad(out.square().sum(), inputs)
    if layer.is_conv:
        assert len(calls) == 2 and calls[0][0] is None and calls[1][0] is calls[0][1]
    else:
        assert calls == []
    weight = layer.merge_weight(adapter, layer.weight)
    expected = torch.autograd.grad(layer.base_operation(x, weight, layer.bias).square().sum(), inputs)
    for got_t, want in zip(got, expected):
        torch.testing.assert_close(got_t, want, rtol=1e-12, atol=1e-14)


def test_sparsity_is_exact_after_a_dtype_cast_and_a_save_load(tmp_path):
    model = nn.Sequential(nn.Linear(30, 20))
    tp.inject(model, tp.SNELLConfig(target_modules=["0"], r=2, sparsity=0.9))
    model.half().float()  # float buffers would be rounded by these casts
    adapter = model[0].adapters["default"]
    assert adapter.sparsity == 0.9
    adapter.sparsity = 0.37
    tp.save_adapter(model, tmp_path)
    fresh = tp.load_adapter(nn.Sequential(nn.Linear(30, 20)), tmp_path)
    assert fresh[0].adapters["default"].sparsity == 0.37


@pytest.mark.parametrize("kept,size", [(3, 10), (51, 100), (16, 50), (0, 7), (7, 7), (123457, 10**7 + 19)])
def test_sparsity_keeping_keeps_exactly(kept, size):
    assert size - dropped_count(sparsity_keeping(kept, size), size) == kept


def test_distribute_worked_examples():
    # floors 50 + 16 = 66 of 67: the last unit goes to the higher score
    assert distribute(67, [0.75, 0.25], [100, 50]) == [51, 16]
    # layer 2 is capped at 50; the 62 left over go to layer 1
    assert distribute(140, [0.2, 0.8], [100, 50]) == [90, 50]
    # all layers full: the budget cannot be spent
    assert distribute(200, [0.5, 0.5], [100, 50]) == [100, 50]


def two_layer_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 5)).double()


SCHEDULE = dict(init_sparsity=0.2, target_sparsity=0.6, total_steps=12, warmup_steps=2, final_steps=4)


def test_budget_follows_the_cubic_schedule():
    model = tp.inject(two_layer_model(), tp.SNELLAConfig(target_modules=[nn.Linear], r=2, **SCHEDULE))
    allocator = tp.SparsityAllocator(model)
    # sizes 100 + 50: V_0 = 0.8·150 = 120, V_T = 0.4·150 = 60, T − t_i − t_f = 6
    expected = {0: 120, 2: 120, 4: 77, 5: 67, 8: 60, 12: 60}  # 4: 60 + 60·(2/3)³ = 77.8
    assert {t: allocator.budget(t) for t in expected} == expected


def train(model, allocator, steps, data, optimizer=None):
    """SGD steps on random data drawn from generator ``data``; the layers' sparsities
    after each step, and the optimizer."""
    optimizer = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    history = []
    for _ in range(steps):
        x = torch.randn(8, 10, generator=data, dtype=torch.float64)
        model(x).square().mean().backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
        history.append(list(allocator.sparsities().values()))
    return history, optimizer


def prepared_allocator(model, how: str) -> tp.SparsityAllocator:
    """A fresh allocator, after what may replace its statistics buffers (the packed views
    of one flat tensor per kind), or left unpacked (the per-tensor path)."""
    allocator = tp.SparsityAllocator(model)
    if how == "cast-round-trip":
        allocator.to(torch.float64).to(torch.float32)
    elif how == "loaded-with-assign":
        allocator.load_state_dict({k: v.clone() for k, v in allocator.state_dict().items()}, assign=True)
    elif how == "unpacked":
        allocator.packed = None
    return allocator


@pytest.mark.parametrize("how", ["fresh", "cast-round-trip", "loaded-with-assign", "unpacked"])
def test_importance_statistics_and_allocation_follow_the_formulas(how):
    config = tp.SNELLAConfig(target_modules=[nn.Linear], r=2, interval=3, **SCHEDULE)
    model = tp.inject(two_layer_model(), config)
    allocator = prepared_allocator(model, how)
    adapters = [model[0].adapters["default"], model[2].adapters["default"]]
    means = [[torch.zeros_like(e) for e in (a.snell_in, a.snell_out)] for a in adapters]
    spreads = copy.deepcopy(means)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(1, 4):
        model(torch.randn(4, 10, dtype=torch.float64)).sum().backward()
        optimizer.step()
        for adapter, mean, spread in zip(adapters, means, spreads):
            for e, (embedding, m, u) in enumerate(zip((adapter.snell_in, adapter.snell_out), mean, spread)):
                importance = (embedding * embedding.grad).abs().float().detach()
                mean[e] = 0.85 * m + 0.15 * importance
                spread[e] = 0.85 * u + 0.15 * (importance - mean[e]).abs()
        allocator.step()
        optimizer.zero_grad()
        if step < 3:
            assert [a.sparsity for a in adapters] == [0.2, 0.2]  # reallocated every 3 steps
    raw = [sum(float((m * u).mean()) for m, u in zip(mean, spread)) for mean, spread in zip(means, spreads)]
    scores = [r / sum(raw) for r in raw]
    assert allocator.scores() == pytest.approx(scores, rel=1e-6)
    # step 3: budget 60 + 60·(5/6)³ = 94.7 -> 94 non-zeros, split by these scores
    kept = [100 - dropped_count(adapters[0].sparsity, 100), 50 - dropped_count(adapters[1].sparsity, 50)]
    assert kept == distribute(94, scores, [100, 50])


def test_resume_from_saved_state_gives_the_same_run(tmp_path):
    config = tp.SNELLAConfig(target_modules=[nn.Linear], r=2, interval=2, **SCHEDULE)
    straight = tp.inject(two_layer_model(), config)
    history, _ = train(straight, tp.SparsityAllocator(straight), 10, torch.Generator().manual_seed(3))
    assert len({tuple(h) for h in history}) > 2  # the sparsities did move

    first = tp.inject(two_layer_model(), config)
    allocator = tp.SparsityAllocator(first)
    data = torch.Generator().manual_seed(3)
    head, optimizer = train(first, allocator, 5, data)
    torch.save({"model": first.state_dict(), "allocator": allocator.state_dict(),
                "optimizer": optimizer.state_dict()}, tmp_path / "checkpoint.pt")  # fmt: skip

    checkpoint = torch.load(tmp_path / "checkpoint.pt")
    resumed = tp.inject(two_layer_model(seed=1), config)  # other init: everything comes from the file
    resumed.load_state_dict(checkpoint["model"])
    allocator = tp.SparsityAllocator(resumed)
    allocator.load_state_dict(checkpoint["allocator"])
    optimizer = torch.optim.SGD([p for p in resumed.parameters() if p.requires_grad], lr=0.1)
    optimizer.load_state_dict(checkpoint["optimizer"])
    tail, _ = train(resumed, allocator, 5, data, optimizer)
    assert head + tail == history
    for got, want in zip(resumed.state_dict().values(), straight.state_dict().values()):
        assert torch.equal(got, want)


def test_allocator_errors_name_the_problem():
    model = tp.inject(two_layer_model(), tp.SNELLConfig(target_modules=[nn.Linear], r=2))
    with pytest.raises(ValueError, match="no SNELLA adapter named 'default'"):
        tp.SparsityAllocator(model)
    model = tp.inject(two_layer_model(), tp.SNELLAConfig(target_modules=[nn.Linear], r=2, **SCHEDULE))
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        tp.SparsityAllocator(model).step()


@pytest.mark.parametrize(
    "make_config,message",
    [
        (lambda: tp.SNELLConfig(target_modules=["fc"], sparsity=1.5), r"sparsity must be in \[0, 1\]"),
        (lambda: tp.SNELLConfig(target_modules=["fc"], r=3, chunks=2), r"chunks \(2\) must divide the rank r \(3\)"),
        (lambda: tp.SNELLConfig(target_modules=["fc"], kernel="cosine"), "kernel must be one of"),
        (lambda: tp.SNELLConfig(target_modules=["fc"], mode="top"), "mode must be one of"),
        (lambda: tp.SNELLAConfig(target_modules=["fc"], total_steps=10, warmup_steps=5, final_steps=5),
         "must be below total_steps"),
        (lambda: tp.SNELLAConfig(target_modules=["fc"], beta1=1.0), r"beta1 must be in \[0, 1\)"),
        (lambda: tp.SNELLAConfig(target_modules=["fc"], interval=0), "interval must be a positive integer"),
    ],
)  # fmt: skip
def test_bad_config_values_raise_naming_the_field(make_config, message):
    with pytest.raises(ValueError, match=message):
        make_config()


@pytest.mark.parametrize("kernel", ["piecewise_linear", "mixture", "linear"])
def test_sparsity_none_is_the_unsparsified_kernelized_delta(tmp_path, kernel):
    """SNELLConfig(sparsity=None): ΔW = κ(Out, In) exactly (not κ⊙|κ|), in the Linear and
    the conv forward, and None survives a save/load."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(9, 7), nn.Conv1d(7, 5, 2)).double()
    tp.inject(model, tp.SNELLConfig(target_modules=["0", "1"], r=4, sparsity=None, kernel=kernel))
    x = torch.randn(3, 9, dtype=torch.float64)
    expected = x
    for layer in model:
        adapter = layer.adapters["default"]
        kappa = ops.kernelized_delta(adapter.snell_out, adapter.snell_in, kernel, **adapter.kernel_params())
        weight = layer.weight + kappa.reshape(layer.weight.shape)
        expected = layer.base_operation(expected if layer.kind == "linear" else expected.T.unsqueeze(0), weight, layer.bias)
    got = model[1](model[0](x).T.unsqueeze(0))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    tp.save_adapter(model, tmp_path)
    fresh = tp.load_adapter(nn.Sequential(nn.Linear(9, 7), nn.Conv1d(7, 5, 2)).double(), tmp_path)
    assert fresh[0].adapters["default"].sparsity is None


def test_quantile_threshold_config_keeps_what_torch_quantile_keeps():
    torch.manual_seed(5)
    model = tp.inject(nn.Sequential(nn.Linear(13, 11)), tp.SNELLConfig(target_modules=["0"], r=2, sparsity=0.9,
                                                                       threshold="quantile"))
    layer = model[0]
    adapter = layer.adapters["default"]
    raw = ops.kernelized_delta(adapter.snell_out, adapter.snell_in, **adapter.kernel_params())
    keep = raw.abs() > torch.quantile(raw.abs(), 0.9)
    torch.testing.assert_close(layer.delta_weight(adapter), raw * raw.abs() * keep, rtol=0, atol=0)


def test_mixture_starts_near_the_base_layer():
    """SNELLA's mixture term at init moves the output by less than 1% (β = −α/m cancels
    the softmax's mean; with the released β = 0 it moves it by tens of percent)."""
    torch.manual_seed(6)
    base = nn.Linear(48, 40)
    x = torch.randn(16, 48)
    expected = base(x)
    layer = tp.nn.SNELLALayer(base, r=8, sparsity=0.5)
    distance = (layer(x) - expected).norm() / expected.norm()
    assert distance < 0.01


def test_floor_keeps_a_layer_of_zero_importance_alive():
    """A layer whose importance is 0 keeps ceil(min_keep·entries) entries at reallocation,
    and the layers together keep exactly the budget."""
    config = tp.SNELLAConfig(target_modules=[nn.Linear], r=2, min_keep=0.05, **SCHEDULE)
    model = tp.inject(two_layer_model(), config)
    allocator = tp.SparsityAllocator(model)
    model(torch.randn(4, 10, dtype=torch.float64)).sum().backward()
    allocator.step()
    for name, statistics in allocator.statistics.items():
        for buffer in statistics.buffers():
            buffer.fill_(0.0 if name == "2" else 1.0)  # layer "2" (50 entries) rates 0
    allocator.allocate(8)  # budget 60
    kept = [int(torch.count_nonzero(layer.delta_weight(layer.adapters["default"]))) for layer in (model[0], model[2])]
    assert kept == [57, 3]  # floors 5 and ceil(0.05·50) = 3, the 52 left all to layer 0
    assert allocator.budget(8) == 60


def test_floors_beyond_the_budget_are_refused():
    config = tp.SNELLAConfig(target_modules=[nn.Linear], r=2, min_keep=0.5, **SCHEDULE)
    with pytest.raises(ValueError, match="min_keep"):
        tp.SparsityAllocator(tp.inject(two_layer_model(), config))


@pytest.mark.parametrize("kernel", list(KERNEL_PARAMS))
def test_adapter_learns_exactly_the_parameters_of_the_ops_table(kernel):
    """The adapter's kernel parameters are those of ops.kernelized_delta.KERNEL_PARAMS (eps,
    a constant, aside), starting at the table's defaults (mixture: beta = −alpha/m, and gamma
    through a softplus); each one is trained: it gets a gradient through the op."""
    torch.manual_seed(7)
    layer = SNELLLayer(nn.Linear(6, 5), r=2, sparsity=None, kernel=kernel, learnable_coeff=True)
    adapter = layer.adapters["default"]
    params = adapter.kernel_params()
    assert set(params) == set(KERNEL_PARAMS[kernel]) - {"eps"}
    for name, value in params.items():
        default = KERNEL_PARAMS[kernel][name]
        if name == "coeff":
            assert value.tolist() == pytest.approx([0.1, -0.1])
        elif (kernel, name) == ("mixture", "beta"):
            assert value.item() == pytest.approx(-KERNEL_PARAMS[kernel]["alpha"] / 5)
        else:
            assert value.item() == pytest.approx(default)
    learned = {name for name, p in adapter.named_parameters() if name not in ("snell_out", "snell_in")}
    scalars = {"alpha", "beta", "gamma"} & set(params)
    assert learned == {"coeff"} & set(params) | ({"scalars"} if scalars else set())  # the scalars in one
    assert set(adapter.scalar_names) == scalars
    ops.kernelized_delta(adapter.snell_out, adapter.snell_in, kernel, **params).square().sum().backward()
    for name in learned:
        assert getattr(adapter, name).grad is not None, name
        assert getattr(adapter, name).grad.ne(0).all(), name  # every scalar is trained


@pytest.mark.parametrize("kernel", ["mixture", "rbf"])
def test_adapters_saved_with_a_parameter_per_scalar_still_load(kernel, tmp_path):
    """Adapters saved before the scalars became one parameter (keys alpha, beta and gamma,
    mixture's gamma as gamma_raw) load, by load_state_dict and from an adapter file, into
    the same function."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 5))
    tp.inject(model, tp.SNELLConfig(target_modules=[nn.Linear], r=2, kernel=kernel, sparsity=0.4))
    with torch.no_grad():
        model[0].adapters["default"].scalars.copy_(torch.tensor([0.3, -0.2, 0.7]))
    x = torch.randn(3, 6)
    expected = model(x)
    names = {"alpha": "alpha", "beta": "beta", "gamma": "gamma_raw" if kernel == "mixture" else "gamma"}
    old = {}
    for key, value in model.state_dict().items():
        if key.endswith(".scalars"):
            old.update({key.replace("scalars", names[n]): value[i : i + 1].clone() for i, n in enumerate(names)})
        else:
            old[key] = value
    assert "0.adapters.default.scalars" not in old and "0.adapters.default.alpha" in old

    def fresh():
        torch.manual_seed(9)
        other = nn.Sequential(nn.Linear(6, 5))
        other[0].load_state_dict(model[0].base_layer.state_dict())
        return tp.inject(other, tp.SNELLConfig(target_modules=[nn.Linear], r=2, kernel=kernel, sparsity=0.4))

    loaded = fresh()
    loaded.load_state_dict(old)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    tp.save_adapter(model, tmp_path / "adapter")
    weights = next((tmp_path / "adapter").glob("*.safetensors"))
    saved = safetensors.torch.load_file(weights)
    (key,) = [k for k in saved if k.endswith(".scalars")]
    scalars = saved.pop(key)
    saved.update({key.replace("scalars", names[n]): scalars[i : i + 1].clone() for i, n in enumerate(names)})
    safetensors.torch.save_file(saved, weights)
    base = nn.Sequential(nn.Linear(6, 5))
    base[0].load_state_dict(model[0].base_layer.state_dict())
    from_file = tp.load_adapter(base, tmp_path / "adapter")
    torch.testing.assert_close(from_file(x), expected, rtol=0, atol=0)
