"""Random sequences of model-level calls (inject, save and load in both formats, merge,
unmerge, unload, set and delete adapters, enable/disable a layer, train/eval, casts to
float64 and back, also replacing the parameters, state dict reloads) on a small model
with an Embedding, a Conv2d, an nn.MultiheadAttention and two Linear layers.
After each step the model's output equals a plain-torch oracle of the active adapter,
computed from the adapter's parameters by each method's math written out here (LoRA
W0 + s·B·A, MTLoRA W0 + s·B·C·D·A, LieRA W0 ⊙ exp(s·B·A)) over the base weights the test
recorded itself; the test predicts which calls must be refused, and a refused call
changes nothing (state dict, adapter names, active and merged adapters, enabled and
training flags, requires_grad)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

import tensor_peft as tp
from tensor_peft.model import adapter_layers

MODULES = ("embed", "conv", "attn", "fc1", "fc2")  # what an adapter may target
NAMES = ("a", "b", "c")
# the adapter layers a target becomes, with the base weight and bias each one adapts
LAYERS = {"embed": ["embed"], "conv": ["conv"], "attn": ["attn.in_proj", "attn.out_proj"], "fc1": ["fc1"],
          "fc2": ["fc2"]}  # fmt: skip
BASE = {"embed": ("embed.weight", None), "conv": ("conv.weight", "conv.bias"),
        "attn.in_proj": ("attn.in_proj_weight", "attn.in_proj_bias"),
        "attn.out_proj": ("attn.out_proj.weight", "attn.out_proj.bias"),
        "fc1": ("fc1.weight", "fc1.bias"), "fc2": ("fc2.weight", "fc2.bias")}  # fmt: skip
IDS = torch.arange(10).reshape(2, 5)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.conv = nn.Conv2d(6, 6, (3, 1), padding=(1, 0))
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, ids):
        h = self.conv(self.embed(ids).transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.fc2(torch.tanh(self.fc1(h)))


def tiny_oracle(w: dict, b: dict, ids):
    """Tiny's forward with the weights ``w`` and biases ``b`` of each layer of ``BASE``."""
    h = w["embed"][ids].transpose(1, 2).unsqueeze(-1)
    h = F.conv2d(h, w["conv"], b["conv"], padding=(1, 0)).squeeze(-1).permute(2, 0, 1)  # (length, batch, 6)
    h = F.multi_head_attention_forward(
        h, h, h, 6, 2, w["attn.in_proj"], b["attn.in_proj"], None, None, False, 0.0, w["attn.out_proj"],
        b["attn.out_proj"], training=False, need_weights=False,
    )[0].transpose(0, 1)  # fmt: skip
    return F.linear(torch.tanh(F.linear(h, w["fc1"], b["fc1"])), w["fc2"], b["fc2"])


def float64(tensor):
    return None if tensor is None else tensor.detach().double().clone()


def low_rank(B, A, scale, shape):
    """s·B·A on the matrix view of a weight of ``shape`` (out, in, *kernel)."""
    return scale * (B @ A.reshape(A.shape[0], -1)).reshape(shape)


def effective_weight(method: str, scale: float, p: dict, W):
    """The weight with one adapter of ``method`` applied; ``W`` and the result in the
    (out, in, *kernel) layout, ``p`` the adapter's parameters by name."""
    if method == "lora":
        return W + low_rank(p["lora_B"], p["lora_A"], scale, W.shape)
    if method == "mtlora":  # variant ctcm: T = C·D
        A = (p["C"] @ p["D"] @ p["lora_A"].reshape(p["lora_A"].shape[0], -1)).reshape(p["lora_A"].shape)
        return W + low_rank(p["lora_B"], A, scale, W.shape)
    return W * torch.exp(low_rank(p["update.lora_B"], p["update.lora_A"], scale, W.shape))  # liera, hadamard


def make_config(method, targets, r, dropout):
    if method == "lora":
        return tp.LoRAConfig(target_modules=targets, r=r, alpha=2.0 * r, dropout=dropout)
    if method == "mtlora":
        return tp.MTLoRAConfig(target_modules=targets, r=r, alpha=1.5 * r, variant="ctcm", dropout=dropout)
    return tp.LieRAConfig(target_modules=targets, r=r, alpha=1.0 * r, dropout=dropout)


SCALES = {"lora": 2.0, "mtlora": 1.5, "liera": 1.0}  # alpha / r of make_config


class ModelCalls(RuleBasedStateMachine):
    """Tracks what the model should be (adapters, active, merged, disabled layers, mode,
    dtype, base weights) and checks the model against it after every call."""

    @initialize(method=st.sampled_from(sorted(SCALES)), modules=st.sets(st.sampled_from(MODULES), min_size=1),
                seed=st.integers(0, 2**16))  # fmt: skip
    def build(self, method, modules, seed):
        torch.manual_seed(0)
        self.model = Tiny().eval()
        parameter = self.model.get_parameter
        self.base = {layer: (float64(parameter(w)), b and float64(parameter(b))) for layer, (w, b) in BASE.items()}
        self.adapters: dict[str, dict] = {}  # name -> method, scale, targets, layers, dropout
        self.active: str | None = None
        self.merged = False
        self.disabled: set[str] = set()
        self.training = False
        self.dtype = torch.float32
        self.directory = Path(tempfile.mkdtemp())
        self.saves = 0
        self.inject("a", method, modules, 2, 0.0, seed)

    def teardown(self):
        shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ the oracle

    def adapter_spec(self, name: str) -> tuple[str, float, dict]:
        """(method, scale, {module: parameters in float64}) of adapter ``name``, read from the model."""
        layers = adapter_layers(self.model)
        parameters = {
            module: {key: p.detach().double() for key, p in layers[module].adapters[name].named_parameters()}
            for module in self.adapters[name]["layers"]
        }
        return self.adapters[name]["method"], self.adapters[name]["scale"], parameters

    def oracle_weights(self, spec=None) -> dict:
        """Each layer's weight with the active adapter (or ``spec``) applied where it is on."""
        weights = {}
        for module, (W, _) in self.base.items():
            layout = W.T if module == "embed" else W  # an embedding's (out, in) is its table transposed
            if spec is not None and module in spec[2] and module not in self.disabled:
                layout = effective_weight(spec[0], spec[1], spec[2][module], layout)
            weights[module] = layout.T if module == "embed" else layout
        return weights

    def active_spec(self):
        return None if self.active is None else self.adapter_spec(self.active)

    def check_output(self, spec) -> None:
        if self.training and self.active is not None and self.adapters[self.active]["dropout"] > 0:
            return  # dropout draws: no deterministic output to compare
        with torch.no_grad():
            out = self.model(IDS)
        expected = tiny_oracle(self.oracle_weights(spec), {m: b for m, (_, b) in self.base.items()}, IDS)
        assert out.dtype == self.dtype
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)

    @invariant()
    def matches_the_oracle(self):
        self.check_output(self.active_spec())

    @invariant()
    def state_is_as_tracked(self):
        layers = adapter_layers(self.model)
        assert set(getattr(self.model, "tensor_peft_configs", {})) == set(self.adapters)
        assert set(layers) == {m for a in self.adapters.values() for m in a["layers"]}
        for module, layer in layers.items():
            holds_active = self.active in layer.adapters
            assert layer.active_adapters == ([self.active] if holds_active else []), module
            assert layer.merged_adapters == ([self.active] if holds_active and self.merged else []), module
            assert layer.adapters_enabled == (module not in self.disabled), module
        assert all(m.training == self.training for m in self.model.modules())
        assert all(p.dtype == self.dtype for p in self.model.parameters())
        for key, p in self.model.named_parameters():  # the active adapter alone is trainable
            assert p.requires_grad == (f".adapters.{self.active}." in key), key

    # ------------------------------------------------------------------ calls

    def snapshot(self):
        layers = adapter_layers(self.model)
        return (
            {k: v.clone() for k, v in self.model.state_dict().items()},
            dict(getattr(self.model, "tensor_peft_configs", {})),
            {n: (list(la.adapters), list(la.active_adapters), list(la.merged_adapters), la.adapters_enabled)
             for n, la in layers.items()},
            {n: (p.requires_grad, p.dtype) for n, p in self.model.named_parameters()},
            [m.training for m in self.model.modules()],
        )  # fmt: skip

    def call(self, refused: bool, function, *args, **kwargs) -> bool:
        """Run a model call that must be refused or not; a refused call must change nothing.
        Returns whether it ran."""
        event(f"{function.__name__} {'refused' if refused else 'runs'}" + (" merged" if self.merged else ""))
        before = self.snapshot()
        try:
            function(*args, **kwargs)
        except (ValueError, TypeError) as error:
            assert refused, f"{function.__name__}{args} refused: {error}"
            after = self.snapshot()
            assert after[0].keys() == before[0].keys()
            assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
            assert after[1:] == before[1:]
            return False
        assert not refused, f"{function.__name__}{args} was not refused"
        return True

    def holds_other_method(self, targets, method) -> bool:
        return any(a["method"] != method and a["targets"] & set(targets) for a in self.adapters.values())

    def add(self, name, method, targets, dropout) -> None:
        layers = {layer for target in targets for layer in LAYERS[target]}
        self.adapters[name] = {"method": method, "scale": SCALES[method], "targets": set(targets), "layers": layers,
                               "dropout": dropout}  # fmt: skip
        self.active = name

    def randomize(self, name: str, seed: int) -> None:
        """Stands for training: moves the new adapter away from its init (where ΔW = 0)."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in adapter_layers(self.model).values():
                if name in layer.adapters:
                    for p in layer.adapters[name].parameters():
                        p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype))

    @rule(name=st.sampled_from(NAMES), method=st.sampled_from(sorted(SCALES)),
          modules=st.sets(st.sampled_from(MODULES), min_size=1), r=st.integers(1, 3),
          dropout=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**16))  # fmt: skip
    def inject(self, name, method, modules, r, dropout, seed):
        targets = sorted(modules)
        refused = (
            name in self.adapters
            or self.merged
            or self.holds_other_method(targets, method)
            or (dropout > 0 and "embed" in targets)  # an embedding's inputs are indices
        )
        if self.call(refused, tp.inject, self.model, make_config(method, targets, r, dropout), name):
            self.add(name, method, targets, dropout)
            self.randomize(name, seed)

    @precondition(lambda self: self.adapters)
    @rule(source=st.sampled_from(NAMES), name=st.sampled_from(NAMES), format=st.sampled_from(["tensor_peft", "peft"]))
    def save_and_load(self, source, name, format):
        self.saves += 1
        path = self.directory / str(self.saves)
        source_method = self.adapters[source]["method"] if source in self.adapters else None
        peft_refuses = source_method == "liera" or "attn" in self.adapters.get(source, {}).get("targets", ())
        refused = source_method is None or (format == "peft" and peft_refuses)
        if not self.call(refused, tp.save_adapter, self.model, path, source, format=format):
            return
        method = "lora" if format == "peft" else source_method  # peft's format holds a LoRA
        targets = self.adapters[source]["targets"]
        refused = name in self.adapters or self.merged or self.holds_other_method(targets, method)
        source_spec = self.adapter_spec(source)
        if self.call(refused, tp.load_adapter, self.model, path, name):
            self.add(name, method, targets, 0.0 if format == "peft" else self.adapters[source]["dropout"])
            self.adapters[name]["scale"] = SCALES[source_method]  # a peft LoRA's alpha keeps the source's scale
            self.check_output(source_spec)  # the loaded adapter computes what the saved one did

    def merge_refused(self) -> bool:
        """A merge with a disabled layer that holds the active adapter unmerged."""
        layers = self.adapters[self.active]["layers"] if self.active else set()
        return not self.merged and bool(layers & self.disabled)

    @rule()
    def merge(self):
        if self.call(self.merge_refused(), tp.merge, self.model):
            self.merged = self.active is not None

    @rule()
    def unmerge(self):
        self.call(False, tp.unmerge, self.model)
        self.merged = False

    @precondition(lambda self: self.adapters)
    @rule(merge=st.booleans())
    def unload(self, merge):
        weights = self.oracle_weights(self.active_spec())
        if self.call(merge and self.merge_refused(), tp.unload, self.model, merge=merge):
            if merge:
                self.base = {m: (weights[m], b) for m, (_, b) in self.base.items()}
            self.adapters, self.active, self.merged, self.disabled = {}, None, False, set()

    @precondition(lambda self: self.adapters)
    @rule(name=st.sampled_from(NAMES))
    def set_adapter(self, name):
        refused = name not in self.adapters or (self.merged and name != self.active)
        if self.call(refused, tp.set_adapter, self.model, name):
            self.active = name

    @precondition(lambda self: self.adapters)
    @rule(name=st.sampled_from(NAMES))
    def delete_adapter(self, name):
        refused = name not in self.adapters or (self.merged and name == self.active)
        if self.call(refused, tp.delete_adapter, self.model, name):
            del self.adapters[name]
            if name == self.active:
                self.active = None
            self.disabled &= {m for a in self.adapters.values() for m in a["layers"]}  # layers still there

    @precondition(lambda self: self.adapters)
    @rule(index=st.integers(0, len(MODULES) - 1), enabled=st.booleans())
    def enable_adapters(self, index, enabled):
        layers = adapter_layers(self.model)
        module = sorted(layers)[index % len(layers)]
        layer = layers[module]
        holds_merged = self.merged and self.active in layer.adapters
        if self.call(not enabled and holds_merged, layer.enable_adapters, enabled):
            (self.disabled.discard if enabled else self.disabled.add)(module)

    @rule(training=st.booleans())
    def train(self, training):
        self.model.train(training)
        self.training = training

    @rule(dtype=st.sampled_from([torch.float64, torch.float32]), overwrite=st.booleans())
    def cast(self, dtype, overwrite):
        """A cast, also one that replaces every parameter by a new one."""
        default = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        try:
            self.model.to(dtype)
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(default)
        self.dtype = dtype

    @rule(assign=st.booleans())
    def reload_state(self, assign):
        """The model's own state loaded back, copied in or assigned (new parameters)."""
        self.model.load_state_dict({k: v.clone() for k, v in self.model.state_dict().items()}, assign=assign)


TestModelCallSequences = ModelCalls.TestCase
TestModelCallSequences.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
