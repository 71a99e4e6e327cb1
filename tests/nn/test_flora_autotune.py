"""FLoRA's ``auto`` mode by measurement: the timed choice is cached per layer and input,
follows the timer, runs the chosen path exactly, and leaves no trace on the caller's
gradients, RNG or checkpointed graph; with timing off the cost model chooses."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from tensor_peft.nn import FLoRALayer, flora

from .test_layers import randomize, tucker_einsum


@pytest.fixture(autouse=True)
def empty_cache():
    flora.clear_execution_cache()
    yield
    flora.clear_execution_cache()


def stub_timer(monkeypatch, faster: str) -> list:
    """Replace the timer by one that says ``faster`` wins; returns the list of its calls."""
    calls = []

    def time_executions(layer, adapter, x):
        calls.append(tuple(x.shape))
        return {"merged": 1.0, "factorized": 2.0} if faster == "merged" else {"merged": 2.0, "factorized": 1.0}

    monkeypatch.setattr(flora, "time_executions", time_executions)
    return calls


def conv_layer_and_input():
    torch.manual_seed(0)
    layer = FLoRALayer(nn.Conv2d(6, 8, 3, padding=1).double(), ranks=[3, 2, 2, 2], scale=0.7)
    randomize(layer)
    return layer, torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)


def linear_layer_and_input():
    torch.manual_seed(0)
    layer = FLoRALayer(nn.Linear(7, 5).double(), r=2, scale=0.7)
    randomize(layer)
    return layer, torch.randn(3, 7, dtype=torch.float64, requires_grad=True)


def reference_output(layer, x):
    """The base layer run with W0 + s·G ×_k U_k by einsum."""
    adapter = layer.adapters["default"]
    weight = layer.weight + tucker_einsum(adapter.core, list(adapter.factors), adapter.scale)
    return functional_call(layer.base_layer, {"weight": weight, "bias": layer.bias}, (x,))


def test_choice_is_timed_once_per_input_shape_and_cache_can_be_cleared(monkeypatch):
    calls = stub_timer(monkeypatch, "factorized")
    layer, x = conv_layer_and_input()
    layer(x)
    layer(x)
    assert calls == [(2, 6, 5, 4)]
    twin = FLoRALayer(nn.Conv2d(6, 8, 3, padding=1).double(), ranks=[3, 2, 2, 2])
    twin(x)  # same shapes, another layer: the cached choice
    assert len(calls) == 1
    layer(x[:1])  # another batch size
    with torch.no_grad():  # another grad mode
        layer(x)
    assert calls == [(2, 6, 5, 4), (1, 6, 5, 4), (2, 6, 5, 4)]
    flora.clear_execution_cache()
    layer(x)
    assert len(calls) == 4


def test_linear_inputs_share_a_timing_by_rows_rounded_to_a_power_of_two(monkeypatch):
    calls = stub_timer(monkeypatch, "merged")
    layer, _ = linear_layer_and_input()
    for shape in [(2, 3, 7), (5, 7), (8, 7), (9, 7), (4, 4, 7)]:  # 6, 5, 8 rows: 8; 9, 16 rows: 16
        layer(torch.randn(shape, dtype=torch.float64))
    assert calls == [(2, 3, 7), (9, 7)]


@pytest.mark.parametrize("faster", ["merged", "factorized"])
@pytest.mark.parametrize("make", [conv_layer_and_input, linear_layer_and_input])
def test_auto_follows_the_timer_and_runs_the_chosen_path_exactly(monkeypatch, make, faster):
    stub_timer(monkeypatch, faster)
    layer, x = make()
    out = layer(x)
    assert layer.last_execution == faster
    expected = reference_output(layer, x)
    torch.testing.assert_close(out, expected)
    params = [x, *layer.adapters["default"].parameters()]
    upstream = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, params, upstream), torch.autograd.grad(expected, params, upstream)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("make", [conv_layer_and_input, linear_layer_and_input])
def test_trial_leaves_gradients_and_rng_untouched(make):
    layer, x = make()
    params = list(layer.adapters["default"].parameters())
    earlier = [torch.randn_like(p) for p in params]  # gradients accumulated before this step
    for parameter, grad in zip(params, earlier):
        parameter.grad = grad.clone()
    x.grad = None
    rng = torch.get_rng_state()
    out = layer(x)  # times both paths first
    assert len(flora._execution_cache) == 1
    assert torch.equal(torch.get_rng_state(), rng)
    assert x.grad is None
    for parameter, grad in zip(params, earlier):
        assert torch.equal(parameter.grad, grad)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected = torch.autograd.grad(reference_output(layer, x), params, upstream)
    for parameter, grad, step in zip(params, earlier, expected):
        torch.testing.assert_close(parameter.grad, grad + step)


def test_trial_inside_gradient_checkpointing():
    """The trial's own graph must not go through the checkpoint's saved-tensor hooks."""
    layer, x = conv_layer_and_input()
    out = checkpoint(layer, x, use_reentrant=False)
    assert len(flora._execution_cache) == 1
    params = [x, *layer.adapters["default"].parameters()]
    upstream = torch.randn_like(out)
    got = torch.autograd.grad(out, params, upstream)
    for got_grad, want in zip(got, torch.autograd.grad(reference_output(layer, x), params, upstream)):
        torch.testing.assert_close(got_grad, want)


def test_timing_off_uses_the_cost_model(monkeypatch):
    calls = stub_timer(monkeypatch, "factorized")
    monkeypatch.setattr(flora, "AUTOTUNE", False)
    for make in (conv_layer_and_input, linear_layer_and_input):
        layer, x = make()
        layer(x)
        merged, factorized = layer.step_costs(layer.adapters["default"], x)
        assert layer.last_execution == ("factorized" if factorized <= merged else "merged")
    assert calls == []


def test_under_torch_compile_no_trial_runs(monkeypatch):
    """Compiled: the cached choice if there is one, else the cost model; never a trial."""
    layer, x = linear_layer_and_input()
    adapter = layer.adapters["default"]
    by_cost = layer.cheaper_by_cost_model(adapter, x)
    other = "merged" if by_cost == "factorized" else "factorized"
    calls = stub_timer(monkeypatch, other)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference_output(layer, x))
    assert calls == [] and layer.last_execution == by_cost
    torch._dynamo.reset()
    layer(x)  # eager: timed, the stub says `other`
    assert layer.last_execution == other and len(calls) == 1
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), reference_output(layer, x))
    assert layer.last_execution == other and len(calls) == 1
    torch._dynamo.reset()
