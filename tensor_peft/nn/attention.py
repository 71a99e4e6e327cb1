"""Adapters on ``nn.MultiheadAttention``: its forward reads ``in_proj_weight`` (or
``q/k/v_proj_weight``) and ``out_proj.weight`` itself, so a wrapped ``out_proj`` alone
would be ignored. ``AdaptedMultiheadAttention`` gives each adapted projection an adapter
layer over a view of the attention's own weight parameter, and runs the attention's own
forward (fast path included) with the projections' effective weights in their place."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import AdapterLayer, WrapsBaseLayer


def projection_weights(attention: nn.MultiheadAttention) -> dict[str, str]:
    """The attention's projections by name, each with the parameter its forward reads."""
    if attention._qkv_same_embed_dim:
        inputs = {"in_proj": "in_proj_weight"}
    else:
        inputs = {name: f"{name}_weight" for name in ("q_proj", "k_proj", "v_proj")}
    return {**inputs, "out_proj": "out_proj.weight"}


class SharedWeightLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a parameter of another module (one of an
    attention's projections), looked up there at each use: it follows the owner when
    its parameters are replaced (``load_state_dict(assign=True)``, a cast that overwrites
    parameters), and merging into it writes the owner's parameter. It holds no
    parameters itself, so the owner's state dict keeps its keys."""

    def __init__(self, owner: nn.Module, parameter_name: str):
        nn.Module.__init__(self)
        weight = owner.get_parameter(parameter_name)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_parameter("bias", None)
        self.training = owner.training
        # not a child module: the owner stays where it is in the module tree
        self.__dict__["_owner"], self._parameter_name = owner, parameter_name

    @property
    def weight(self) -> nn.Parameter:
        return self._owner.get_parameter(self._parameter_name)


class AdaptedMultiheadAttention(WrapsBaseLayer):
    """``base_layer`` (an ``nn.MultiheadAttention``) with adapter layers on some of its
    projections (children named as in ``projection_weights``)."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        self.base_layer = attention
        self.training = attention.training

    def projection(self, name: str) -> AdapterLayer | None:
        return self._modules.get(name)

    def projections(self) -> dict[str, AdapterLayer]:
        return {name: m for name, m in self.named_children() if isinstance(m, AdapterLayer)}

    def add_projection(self, name: str, make_layer) -> AdapterLayer:
        """Wrap projection ``name`` by ``make_layer(linear view of its weight)``."""
        layer = make_layer(SharedWeightLinear(self.base_layer, projection_weights(self.base_layer)[name]))
        setattr(self, name, layer)
        return layer

    def forward(self, *args, **kwargs):
        weights, parameter_names = {}, projection_weights(self.base_layer)
        for name, layer in self.projections().items():
            base = self.base_layer.get_parameter(parameter_names[name])
            weights[parameter_names[name]] = layer.effective_weight().to(base.dtype)
        return torch.func.functional_call(self.base_layer, weights, args, kwargs, strict=False)
