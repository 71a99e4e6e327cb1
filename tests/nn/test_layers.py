"""Adapter-layer conformance for every method over every base layer type and conv
geometry: identical output at init, the forward and every gradient against the method's
formula applied independently (the base layer run with W0 + ΔW), merge/unmerge,
dropout, the dtype policy and the refusal of non-finite merges."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tensor_peft import backends
from tensor_peft import ops as tp_ops
from tensor_peft.backends import registry
from tensor_peft.nn import FLoRALayer, LieRALayer, LoRALayer, MTLoRALayer, SNELLALayer, SNELLLayer

GEOMETRIES = {
    "linear": lambda: nn.Linear(7, 5),
    "linear-nobias": lambda: nn.Linear(6, 4, bias=False),
    "conv1d-stride": lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1),
    "conv1d-circular": lambda: nn.Conv1d(3, 5, 4, padding=2, padding_mode="circular"),
    "conv1d-depthwise": lambda: nn.Conv1d(4, 4, 3, groups=4),
    "conv2d-nonsquare": lambda: nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 0)),
    "conv2d-same-reflect": lambda: nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect"),
    "conv2d-dilation": lambda: nn.Conv2d(4, 5, 3, dilation=2, padding=2, bias=False),
    "conv2d-groups": lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1),
    "conv2d-depthwise-valid": lambda: nn.Conv2d(4, 8, 3, groups=4, padding="valid"),
    "conv2d-replicate": lambda: nn.Conv2d(3, 5, (1, 3), padding=(0, 1), padding_mode="replicate"),
    "conv3d": lambda: nn.Conv3d(2, 4, (2, 3, 1), stride=(1, 2, 1), padding=1),
    "conv3d-depthwise-same": lambda: nn.Conv3d(3, 3, 3, groups=3, padding="same", padding_mode="circular"),
}
INPUT_SPATIAL = {1: (9,), 2: (7, 6), 3: (4, 5, 3)}


def transform(adapter) -> torch.Tensor:
    """MTLoRA's T per variant, written out here (identity for LoRA)."""
    variant = getattr(adapter, "variant", None)
    if variant is None:
        return torch.eye(adapter.r, dtype=adapter.lora_A.dtype)
    C, D = adapter.C, getattr(adapter, "D", None)
    return {"shim": lambda: C, "icfm": lambda: C @ C.T, "ctcm": lambda: C @ D, "dtsm": lambda: C + D}[variant]()


def tucker_einsum(core, factors, scale) -> torch.Tensor:
    letters = "abcdefghijklmnopqrstuvwxyz"
    ranks, dims = letters[: core.dim()], letters[13 : 13 + core.dim()]
    spec = ",".join([ranks] + [d + r for d, r in zip(dims, ranks)]) + "->" + dims
    return scale * torch.einsum(spec, core, *factors)


def snell_kernel(adapter) -> torch.Tensor:
    """ΔW_raw[j, i] = κ(b_j, a_i) by SNELL's definition, from broadcast differences and dot products."""
    out, into = adapter.snell_out, adapter.snell_in  # (H, m, p), (H, n, p)
    b, a = out.transpose(0, 1).flatten(1), into.transpose(0, 1).flatten(1)  # chunks concatenated
    squared = ((b[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    if adapter.kernel in ("piecewise_linear", "mixture"):
        chunk_distances = (((out[:, :, None, :] - into[:, None, :, :]) ** 2).sum(-1) + 1e-12).sqrt()
        piecewise = (adapter.coeff[:, None, None] * chunk_distances).sum(0)
        if adapter.kernel == "piecewise_linear":
            return piecewise
        alpha, beta, gamma_raw = adapter.scalars
        return piecewise + alpha * torch.softmax(piecewise / F.softplus(gamma_raw), dim=0) + beta
    alpha, beta, gamma = adapter.scalars if adapter.kernel in ("rbf", "sigmoid") else (None,) * 3
    if adapter.kernel == "rbf":
        return alpha * torch.exp(-beta * squared) + gamma
    if adapter.kernel == "sigmoid":
        return alpha * torch.sigmoid(beta * b @ a.T) + gamma
    return b @ a.T


def snell_delta(adapter) -> torch.Tensor:
    """SNELL's competition: drop the k = ceil(s·m·n) smallest |ΔW_raw| (τ from a full sort),
    hard ΔW_raw ⊙ sg(|ΔW_raw|), soft ΔW_raw ⊙ (|ΔW_raw| − sg(τ))⁺."""
    raw = snell_kernel(adapter)
    magnitude = raw.abs()
    k = math.ceil(round(adapter.sparsity * raw.numel(), 9))
    tau = magnitude.detach().flatten().sort().values[k - 1] if k else -math.inf
    keep = magnitude > tau
    if adapter.mode == "hard":
        return raw * magnitude.detach() * keep
    return raw * (magnitude - max(float(tau), 0.0)) * keep


def spec_delta(layer, adapter) -> torch.Tensor:
    """ΔW from the adapter's parameters by each method's definition: FLoRA's Tucker update (one einsum),
    SNELL's kernelized sparse update, or s·B·T·A on the matrix view for LoRA / MTLoRA."""
    if hasattr(adapter, "snell_out"):
        return snell_delta(adapter).reshape(layer.weight.shape)
    if hasattr(adapter, "core"):
        return tucker_einsum(adapter.core, list(adapter.factors), adapter.scale)
    A = adapter.lora_A.reshape(adapter.r, -1)
    return (adapter.alpha / adapter.r * adapter.lora_B @ transform(adapter) @ A).reshape(layer.weight.shape)


def taylor_expm(S: torch.Tensor, terms: int = 40) -> torch.Tensor:
    """exp(S) by its Taylor series (differentiable; exact to float64 for the small norms here)."""
    assert torch.linalg.matrix_norm(S, 1) < 4
    result = term = torch.eye(S.shape[-1], dtype=S.dtype)
    for k in range(1, terms):
        term = term @ S / k
        result = result + term
    return result


def spec_weight(layer, adapter) -> torch.Tensor:
    """W_eff by each method's definition: W0 + ΔW; LieRA W0 ⊙ exp(ΔW) or W0 ⊙ (1 + ΔW) (hadamard), or
    blockdiag(exp(S_i))·W0 with S_i = A_i − A_iᵀ (orthogonal) or A_i (gl)."""
    W0 = layer.base_layer.weight
    group = getattr(adapter, "group", None)
    if group is None:
        return W0 + spec_delta(layer, adapter).to(W0.dtype)
    if group == "hadamard":
        delta = spec_delta(layer, adapter.update)
        return W0 * (torch.exp(delta) if adapter.exp == "exact" else 1 + delta)
    n, A = adapter.block_size, adapter.generators
    if group == "orthogonal":  # the stored entries fill the strict upper triangle row by row
        S = torch.stack([torch.zeros(n, n, dtype=A.dtype).masked_scatter(torch.ones(n, n).triu(1).bool(), a) for a in A])
        S = S - S.transpose(-1, -2)
    else:
        S = A.reshape(-1, n, n)
    rotation = torch.block_diag(*[taylor_expm(block) for block in S])
    matrix = W0.reshape(W0.shape[0], -1)
    return (rotation @ matrix if adapter.side == "output" else matrix @ rotation).reshape(W0.shape)


def spec_forward(layer, adapter, x) -> torch.Tensor:
    """The base layer itself, run with W_eff."""
    base = layer.base_layer
    return functional_call(base, {"weight": spec_weight(layer, adapter), "bias": base.bias}, (x,))


METHODS = {
    "lora": lambda base, **kw: LoRALayer(base, r=3, alpha=5.0, **kw),
    **{f"mtlora-{v}": (lambda v: lambda base, **kw: MTLoRALayer(base, r=3, alpha=5.0, variant=v, **kw))(v)
       for v in ("shim", "icfm", "ctcm", "dtsm")},
    **{f"flora-{m}": (lambda m: lambda base, **kw: FLoRALayer(base, r=3, scale=0.8, execution=m, **kw))(m)
       for m in ("merged", "factorized", "auto")},
    "liera-lora-exact": lambda base, **kw: LieRALayer(base, r=2, alpha=1.0, **kw),
    "liera-lora-taylor1": lambda base, **kw: LieRALayer(base, r=2, alpha=1.0, exp="taylor1", **kw),
    "liera-flora-exact": lambda base, **kw: LieRALayer(base, inner="flora", ranks=[2] * base.weight.dim(), scale=0.5, **kw),
    **{f"liera-{g}": (lambda g: lambda base, **kw: LieRALayer(
        base, group=g, block_size=next(b for b in (3, 2, 1) if base.weight.shape[0] % b == 0), **kw))(g)
       for g in ("orthogonal", "gl")},
    "liera-orthogonal-input": lambda base, **kw: LieRALayer(
        base, group="orthogonal", side="input", block_size=next(b for b in (3, 2, 1) if base.weight[0].numel() % b == 0),
        **kw),
    "snell-piecewise-hard": lambda base, **kw: SNELLLayer(base, r=4, sparsity=0.6, **kw),
    "snell-rbf-soft": lambda base, **kw: SNELLLayer(base, r=2, sparsity=0.3, kernel="rbf", mode="soft", **kw),
    "snell-sigmoid-hard": lambda base, **kw: SNELLLayer(base, r=3, sparsity=0.5, kernel="sigmoid", chunks=3, **kw),
    "snell-linear-soft": lambda base, **kw: SNELLLayer(base, r=2, sparsity=0.0, kernel="linear", mode="soft", **kw),
    "snella-mixture": lambda base, **kw: SNELLALayer(base, r=4, sparsity=0.7, learnable_coeff=True, **kw),
}  # fmt: skip


def make(method: str, geometry: str, dtype=torch.float64, **options):
    torch.manual_seed(0)
    base = GEOMETRIES[geometry]().to(dtype)
    if method == "flora-factorized" and getattr(base, "groups", 1) > 1:
        pytest.skip("factorized FLoRA needs groups == 1 (grouped convs run merged)")
    layer = METHODS[method](base, **options)
    batch = 2 if geometry != "linear" else 1
    if isinstance(base, nn.Linear):
        x = torch.randn(batch, 3, base.in_features, dtype=dtype)
    else:
        x = torch.randn(batch, base.in_channels, *INPUT_SPATIAL[base.weight.dim() - 2], dtype=dtype)
    return layer, x


def randomize(layer, name="default", scale=0.3):
    """Move the adapter off its init (B = 0 makes every ΔW zero)."""
    with torch.no_grad():
        for parameter in layer.adapters[name].parameters():
            parameter.add_(torch.randn_like(parameter) * scale)


method_param = pytest.mark.parametrize("method", list(METHODS))
geometry_param = pytest.mark.parametrize("geometry", list(GEOMETRIES))


@method_param
@geometry_param
def test_equals_base_at_init(method, geometry):
    if method.startswith("snell"):
        pytest.skip("SNELL's embeddings start random (as in the paper), so ΔW is small but not zero at init")
    layer, x = make(method, geometry)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert layer.weight is layer.base_layer.weight  # the base layer's attributes read through
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert all(p.requires_grad for p in layer.adapters.parameters())


@method_param
@geometry_param
def test_forward_and_gradients_match_spec(method, geometry):
    layer, x = make(method, geometry)
    randomize(layer)
    assert_matches_spec(layer, x)


def assert_matches_spec(layer, x):
    """The layer's output and the gradients of x and every adapter parameter equal the method's
    formula (float64)."""
    adapter = layer.adapters["default"]
    x.requires_grad_()
    params = [x, *adapter.parameters()]
    out, expected = layer(x), spec_forward(layer, adapter, x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, params, upstream), torch.autograd.grad(expected, params, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@method_param
@geometry_param
def test_merge_equals_unmerged_and_unmerge_restores(method, geometry):
    layer, x = make(method, geometry)
    randomize(layer)
    weight = layer.weight.detach().clone()
    merged_weight = spec_weight(layer, layer.adapters["default"]).detach()
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer.weight, merged_weight, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-13)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, weight, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("geometry", ["linear", "conv2d-groups", "conv3d"])
def test_unmerge_in_float32_is_within_rounding(geometry):
    layer, x = make("lora", geometry, dtype=torch.float32)
    randomize(layer)
    weight = layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, weight, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("geometry", ["linear", "conv2d-same-reflect"])
def test_dropout_applies_to_the_adapter_input_only(geometry):
    layer, x = make("lora", geometry, dropout=0.5)
    randomize(layer)
    adapter = layer.adapters["default"]
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    expected = layer.base_layer(x) + (spec_forward(layer, adapter, dropped) - layer.base_layer(dropped))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    layer.eval()
    torch.testing.assert_close(layer(x), spec_forward(layer, adapter, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("geometry", ["linear", "conv2d-groups"])
def test_half_base_gets_float32_adapters_and_float32_math(geometry):
    layer, x = make("mtlora-ctcm", geometry, dtype=torch.bfloat16)
    adapter = layer.adapters["default"]
    assert adapter.lora_A.dtype == torch.float32 and adapter.C.dtype == torch.float32
    assert torch.equal(layer(x), layer.base_layer(x))
    randomize(layer)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    base32 = layer.base_layer.float()
    delta32 = spec_forward(layer, adapter, x.float()) - base32(x.float())
    layer.base_layer.to(torch.bfloat16)
    expected = (layer.base_layer(x) + delta32.to(torch.bfloat16))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_merge_that_would_overflow_refuses_and_keeps_the_weight():
    layer = LoRALayer(nn.Linear(4, 3).half(), r=2)
    with torch.no_grad():
        layer.adapters["default"].lora_B.fill_(300.0)
        layer.adapters["default"].lora_A.fill_(300.0)
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite values in torch.float16; the weight is left unchanged"):
        layer.merge()
    assert torch.equal(layer.weight, weight) and layer.merged_adapters == []


HYPER_PARAMETERS = ("r", "scale", "variant", "ranks", "execution", "group", "inner", "exp", "side", "kernel", "mode",
                    "threshold", "sparsity")


@pytest.mark.parametrize("layer_class", [LoRALayer, MTLoRALayer, FLoRALayer, LieRALayer, SNELLLayer, SNELLALayer])
def test_add_adapter_takes_the_constructor_defaults_for_the_options_not_given(layer_class):
    """``add_adapter("second", r=2)`` adds the adapter ``layer_class(base, r=2)`` makes (the
    same hyper-parameters, and the same init from the same seed), and the layer runs it."""
    base = nn.Linear(6, 4).double()
    torch.manual_seed(0)
    layer = layer_class(base, r=2)
    torch.manual_seed(0)
    layer.add_adapter("second", r=2)
    first, second = layer.adapters["default"], layer.adapters["second"]
    for name in HYPER_PARAMETERS:
        assert getattr(first, name, None) == getattr(second, name, None), name
    assert first.state_dict().keys() == second.state_dict().keys()
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    randomize(layer, "second")
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(layer(x), spec_forward(layer, second, x))


def test_several_adapters_switch_disable_and_delete():
    layer, x = make("lora", "conv2d-nonsquare")
    randomize(layer)
    layer.add_adapter("second", r=2, alpha=1.0)
    randomize(layer, "second")
    assert layer.active_adapters == ["second"]
    torch.testing.assert_close(layer(x), spec_forward(layer, layer.adapters["second"], x))
    layer.set_adapter("default")
    torch.testing.assert_close(layer(x), spec_forward(layer, layer.adapters["default"], x))
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.enable_adapters(True)
    layer.merge()
    with pytest.raises(ValueError, match="unmerge before disabling"):
        layer.enable_adapters(False)
    with pytest.raises(ValueError, match="is merged: unmerge it before deleting"):
        layer.delete_adapter("default")
    layer.unmerge()
    layer.delete_adapter("second")
    assert list(layer.adapters) == ["default"]
    with pytest.raises(ValueError, match="no adapter 'second'"):
        layer.set_adapter("second")


@pytest.mark.parametrize(
    "make_layer,error,message",
    [
        (lambda: LoRALayer(nn.ReLU()), TypeError, "adapters wrap Linear, Conv1d"),
        (lambda: LoRALayer(nn.Linear(3, 2), r=0), ValueError, "r must be a positive integer"),
        (lambda: LoRALayer(nn.Linear(3, 2), alpha=float("inf")), ValueError, "alpha must be finite"),
        (lambda: LoRALayer(nn.Linear(3, 2), alpha="8"), TypeError, "alpha must be a real number"),
        (lambda: LoRALayer(nn.Linear(3, 2), dropout=1.0), ValueError, r"dropout must be a probability in \[0, 1\)"),
        (lambda: LoRALayer(nn.Linear(3, 2), adapter_name="a b"), ValueError, "adapter_name must be"),
        (lambda: MTLoRALayer(nn.Linear(3, 2), variant="xyz"), ValueError, "variant must be one of"),
        (lambda: FLoRALayer(nn.Linear(3, 2), execution="fast"), ValueError, "execution must be one of"),
        (lambda: FLoRALayer(nn.Linear(3, 2), ranks=[2, 2, 2]), ValueError, "ranks must give one rank per weight mode"),
        (lambda: FLoRALayer(nn.Conv2d(4, 4, 3, groups=2), execution="factorized"), ValueError, "needs groups == 1"),
        (lambda: LieRALayer(nn.Linear(3, 6), group="orthogonal", block_size=4), ValueError, "block_size 4 must divide"),
        (lambda: LieRALayer(nn.Linear(3, 6), inner="hira"), ValueError, "inner must be one of"),
    ],
)
def test_bad_layer_arguments(make_layer, error, message):
    with pytest.raises(error, match=message):
        make_layer()


def test_flora_init_ranks_and_clipping():
    with pytest.warns(UserWarning, match=r"clipped to \[4, 4, 2, 1\]"):
        layer = FLoRALayer(nn.Conv2d(8, 6, (3, 1)), r=4)
    adapter = layer.adapters["default"]
    assert adapter.ranks == [4, 4, 2, 1]  # the last default rank 2 is clipped to the kernel's 1
    assert not adapter.core.any()
    big = FLoRALayer(nn.Linear(4000, 3000), r=50)
    for factor, rank in zip(big.adapters["default"].factors, [50, 50]):
        assert abs(factor.var().item() - 1 / (2 * rank)) < 0.05 / (2 * rank)  # N(0, 1/(2 r_k))
    with pytest.warns(UserWarning, match=r"clipped to \[3, 2\]"):
        FLoRALayer(nn.Linear(2, 3), r=5)


@pytest.mark.parametrize("geometry", ["linear", "conv2d-same-reflect", "conv3d"])
def test_flora_auto_picks_by_cost_and_says_so(geometry, monkeypatch):
    monkeypatch.setattr("tensor_peft.nn.flora.AUTOTUNE", False)
    layer, x = make("flora-auto", geometry)
    layer(x)
    merged, factorized = layer.step_costs(layer.adapters["default"], x)
    assert layer.last_execution == ("factorized" if factorized <= merged else "merged")
    assert f"last_execution={layer.last_execution}" in repr(layer)
    assert layer.output_positions(x) * layer.weight.shape[0] == layer.base_layer(x).numel()


def test_liera_taylor1_merge_that_would_zero_the_weight_refuses():
    layer = LieRALayer(nn.Linear(3, 2).double(), r=1, alpha=1.0, exp="taylor1")
    with torch.no_grad():  # 1 + ΔW = 0 at entry (0, 0): merging would lose W0 there
        layer.adapters["default"].update.lora_B.fill_(1.0)
        layer.adapters["default"].update.lora_A.fill_(-1.0)
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="cannot merge adapter 'default': it would zero non-zero entries"):
        layer.merge()
    assert torch.equal(layer.weight, weight) and layer.merged_adapters == []


@pytest.mark.parametrize("make_base", [
    lambda: nn.Linear(20, 16),
    lambda: nn.Conv1d(12, 10, 4, stride=2, padding=2, padding_mode="circular"),
    lambda: nn.Conv2d(16, 12, (3, 2), padding="same", padding_mode="reflect"),
    lambda: nn.Conv2d(12, 16, 3, dilation=2, padding="same"),
    lambda: nn.Conv3d(10, 12, (2, 3, 1), stride=(1, 2, 1), padding=1),
])  # fmt: skip
def test_flora_merged_backward_by_projected_weight_gradients_matches_spec(make_base):
    """Channels wide enough for the merged path to take the projected gradients."""
    torch.manual_seed(0)
    base = make_base().double()
    layer = FLoRALayer(base, r=3, scale=0.8, execution="merged")
    randomize(layer)
    assert layer.projects_gradients(layer.adapters["default"])
    spatial = INPUT_SPATIAL.get(base.weight.dim() - 2, ())
    x = torch.randn(2, *((3, base.in_features) if isinstance(base, nn.Linear) else (base.in_channels, *spatial)),
                    dtype=torch.float64)  # fmt: skip
    assert_matches_spec(layer, x)


@pytest.mark.parametrize("backend", backends.available("cpu"))
def test_flora_projected_gradients_run_on_the_backend_asked_for(backend, monkeypatch):
    """The merged path's projected gradients are an op dispatched like the others: under
    use(backend) that backend's kernel computes them, and they equal the formula's."""
    torch.manual_seed(0)
    layer = FLoRALayer(nn.Conv2d(12, 10, 3, padding=1).double(), r=2, scale=0.8, execution="merged")
    randomize(layer)
    original, calls = registry.kernel("tucker_projected_backward", backend), []
    spy = lambda *args: calls.append(backend) or original(*args)  # noqa: E731
    monkeypatch.setitem(registry._KERNELS, ("tucker_projected_backward", backend), spy)
    with backends.use(backend):
        assert_matches_spec(layer, torch.randn(2, 12, 5, 4, dtype=torch.float64))
    assert calls == [backend]


@pytest.mark.parametrize("make_layer", [
    lambda: LieRALayer(nn.Linear(12, 10), r=2),
    lambda: LieRALayer(nn.Conv2d(4, 6, 3), group="orthogonal", block_size=3),
    lambda: FLoRALayer(nn.Linear(12, 10), r=2, execution="merged"),  # projected weight gradients
    lambda: FLoRALayer(nn.Conv2d(4, 6, 3, groups=2), r=2, execution="merged"),  # autograd through the merge
])  # fmt: skip
def test_merged_paths_keep_no_effective_weight_for_backward(make_layer, monkeypatch):
    """The effective weight is made again in backward instead of being kept: made twice
    per step (the hadamard Linear's, block of rows by block), and the gradients still equal
    those of the formula."""
    torch.manual_seed(0)
    layer = make_layer().double()
    with torch.no_grad():
        for parameter in layer.adapters.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    made = []
    if isinstance(layer, FLoRALayer):
        owner, name = tp_ops, "tucker_merge"
    elif isinstance(layer.base_layer, nn.Linear) and layer.adapters["default"].group == "hadamard":
        owner = importlib.import_module("tensor_peft.ops.lowrank_hadamard_merge")  # ops.hadamard_linear's blocks
        name = "_merged_rows"
    else:
        owner, name = layer, "merge_weight"
    original = getattr(owner, name)

    def recorded(*args, **kwargs):
        weight = original(*args, **kwargs)
        made.append(weight.shape[0] / layer.weight_shape[0])  # the share of the effective weight's rows
        return weight

    monkeypatch.setattr(owner, name, recorded)
    x = torch.randn(3, *((12,) if isinstance(layer.base_layer, nn.Linear) else (4, 5, 5)), dtype=torch.float64)
    x.requires_grad_(True)  # as inside a model: ∂L/∂x needs the effective weight
    layer(x).square().sum().backward()
    assert sum(made) == 2
    adapter = layer.adapters["default"]
    expected = torch.autograd.grad(spec_forward(layer, adapter, x).square().sum(), [x, *adapter.parameters()])
    for value, grad in zip([x, *adapter.parameters()], expected):
        torch.testing.assert_close(value.grad, grad)


def saved_activation_elements(layer, x) -> int:
    """Elements of the distinct storages the forward saves for backward that hold a row
    per token (x's leading dimensions): activations, not weights."""
    tokens, storages = math.prod(x.shape[:-1]), {}

    def pack(saved):
        if saved.dim() >= 2 and math.prod(saved.shape[:-1]) == tokens:
            storages[saved.untyped_storage().data_ptr()] = saved.untyped_storage().nbytes() // saved.element_size()
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        layer(x)
    return sum(storages.values())


@pytest.mark.parametrize("make_layer", [
    lambda: MTLoRALayer(nn.Linear(12, 10), r=3),
    lambda: FLoRALayer(nn.Linear(12, 10), r=3, execution="factorized"),
])  # fmt: skip
def test_low_rank_forward_keeps_no_more_activations_than_lora(make_layer):
    """A layer with an r×r core between its factors saves what LoRA saves for backward
    (the input and one map of r channels per token), not a second r-channel map."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12, requires_grad=True)
    assert saved_activation_elements(make_layer(), x) == saved_activation_elements(LoRALayer(nn.Linear(12, 10), r=3), x)
