"""LieRA: the weight is an element of a Lie group and the update a Lie-algebra element
mapped back by the exponential (Si et al., ICCV 2025).

- ``group="hadamard"`` (the paper): W_eff = W0 ⊙ exp(ΔW), elementwise, with ΔW from an
  inner method: ``inner="lora"`` (s·B·A on the matrix view, s = alpha/r, conv A keeps
  its spatial structure; A kaiming-uniform(a=√5), B = 0) or ``inner="flora"`` (the FLoRA
  Tucker update). ``exp="exact"`` (fused by ``ops.lowrank_hadamard_merge`` for LoRA) or
  ``"taylor1"``: W0 ⊙ (1 + ΔW), the authors' released form. Zero entries of W0 never move.
- ``group="orthogonal"`` / ``"gl"`` (matrix groups, beyond the paper): W_eff = R·W0
  (``side="output"``, R acting on output channels) or W0·R (``side="input"``, on the
  matrix view's columns, as peft's OFT), R = blockdiag(exp(S_1), …, exp(S_nb)) in blocks
  of ``block_size``; S_i skew-symmetric (rotations; only its n(n−1)/2 upper entries are
  parameters) or any matrix (gl). S_i = 0 at init, so R = I.

Every update is multiplicative, so the layer runs one conv/linear with W_eff, merging
multiplies the weight in, and unmerging multiplies by the inverse (exp(−ΔW), 1/(1 + ΔW),
exp(−S))."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..config import EXP_FORMS, GROUPS, INNERS, SIDES, check_choice, check_rank, check_real
from ..ops.lowrank_hadamard_merge import hadamard_update_linear
from .base import Adapter, AdapterLayer, adapter_dtype_for
from .flora import FLoRAAdapter
from .lora import LoRAAdapter


class LieRAAdapter(Adapter):
    def __init__(self, layer: AdapterLayer, r, alpha, group, inner, exp, block_size, side, scale, ranks, dropout,
                 dtype):  # fmt: skip
        super().__init__(dropout)
        check_real(alpha, "alpha")  # also where no inner LoRA takes it
        self.group = check_choice(group, "group", GROUPS)
        self.inner = check_choice(inner, "inner", INNERS)
        self.exp = check_choice(exp, "exp", EXP_FORMS)
        self.side = check_choice(side, "side", SIDES)
        if group != "hadamard":
            size = layer.weight.shape[0] if side == "output" else layer.weight[0].numel()
            block_size = check_rank(block_size, "block_size")
            if size % block_size:
                channels = "output channels" if side == "output" else "inputs (in_features × kernel)"
                raise ValueError(f"block_size {block_size} must divide the {channels} ({size})")
            factory = dict(dtype=adapter_dtype_for(layer.weight, dtype), device=layer.weight.device)
            self.block_size = block_size
            # the free parameters only: S_i's strictly upper triangle (orthogonal), all of A_i (gl)
            free = block_size * (block_size - 1) // 2 if group == "orthogonal" else block_size * block_size
            self.generators = nn.Parameter(torch.zeros(size // block_size, free, **factory))
        elif inner == "lora":
            self.update = LoRAAdapter(layer, r, alpha, 0.0, dtype)
        else:
            self.update = FLoRAAdapter(layer, r, ranks, scale, "merged", 0.0, dtype)

    def algebra_element(self) -> Tensor:
        """The generators S_i of the matrix groups: skew-symmetric from their upper
        triangle (orthogonal), or the block itself (gl)."""
        blocks, size = self.generators.shape[0], self.block_size
        if self.group == "gl":
            return self.generators.reshape(blocks, size, size)
        rows, columns = torch.triu_indices(size, size, 1, device=self.generators.device)
        upper = self.generators.new_zeros(blocks, size, size)
        upper[:, rows, columns] = self.generators
        return upper - upper.transpose(-1, -2)


class LieRALayer(AdapterLayer):
    """A frozen Linear/Conv1d/Conv2d/Conv3d with LieRA adapters (drop-in replacement)."""

    method = "liera"
    no_low_rank_form = "LieRA's W0 ⊙ exp(ΔW) (or blockdiag(exp(S))·W0) is multiplicative: peft's LoRA (W0 + B·A) cannot hold it"

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        alpha: float = 8.0,
        group: str = "hadamard",
        inner: str = "lora",
        exp: str = "exact",
        block_size: int = 4,
        side: str = "output",
        scale: float = 1.0,
        ranks: list[int] | None = None,
        dropout: float = 0.0,
        adapter_name: str = "default",
        dtype: torch.dtype | None = None,
    ):
        super().__init__(
            base_layer, adapter_name, r=r, alpha=alpha, group=group, inner=inner, exp=exp,
            block_size=block_size, side=side, scale=scale, ranks=ranks, dropout=dropout, dtype=dtype,
        )  # fmt: skip

    def _new_adapter(self, **options) -> Adapter:
        return LieRAAdapter(self, **options)

    def group_action(self, adapter: Adapter, weight: Tensor, inverse: bool, rounded: bool = False) -> Tensor:
        """The group element of ``adapter`` (or its inverse) acting on ``weight``, in the
        weight's dtype promoted to the adapter's compute dtype; ``rounded``: a hadamard
        merge of an inner LoRA returns the weight's dtype instead, the op reading a half
        weight as it is (computed in float32 and rounded once, so no float32 copy of W0 on
        a backend whose kernels take half tensors)."""
        dtype = torch.promote_types(weight.dtype, self.compute_dtype(adapter))
        if adapter.group != "hadamard":
            S = adapter.algebra_element().to(dtype)
            rotation = ops.matrix_exp(-S if inverse else S)
            if adapter.side == "output":  # R·W0 on the matrix view, R acting on blocks of rows
                blocks = weight.to(dtype).reshape(rotation.shape[0], adapter.block_size, -1)
                return (rotation @ blocks).reshape(weight.shape)
            blocks = weight.to(dtype).reshape(weight.shape[0], rotation.shape[0], adapter.block_size)
            return torch.einsum("onj,nji->oni", blocks, rotation).reshape(weight.shape)  # W0·R on blocks of columns
        update = adapter.update
        if adapter.inner == "lora" and not inverse:
            B, A = update.lora_B.to(dtype), update.lora_A.to(dtype)
            return ops.lowrank_hadamard_merge(weight if rounded else weight.to(dtype), B, A, update.scale, adapter.exp)
        if adapter.inner == "lora":
            B, A = update.lora_B.to(dtype), update.lora_A.to(dtype).reshape(update.r, -1)
            delta = (update.scale * B @ A).reshape(weight.shape)
        else:
            factors = [f.to(dtype) for f in update.factors]
            delta = ops.tucker_delta(update.core.to(dtype), factors, update.scale)
        if adapter.exp == "exact":
            return weight * torch.exp(-delta if inverse else delta)
        return weight / (1 + delta) if inverse else weight * (1 + delta)

    def merge_weight(self, adapter: Adapter, weight: Tensor, rounded: bool = False) -> Tensor:
        """``group_action`` (``rounded``: see there)."""
        return self.group_action(adapter, weight, inverse=False, rounded=rounded)

    def unmerge_weight(self, adapter: Adapter, weight: Tensor) -> Tensor:
        return self.group_action(adapter, weight, inverse=True)

    def merge_refusal(self, weight: Tensor, result: Tensor) -> str | None:
        """Also refuses a result that zeroes a non-zero entry of the weight (1 + ΔW = 0 in
        taylor1, exp(ΔW) underflowing in the weight's dtype): the inverse could not bring
        that entry back."""
        reason = super().merge_refusal(weight, result)
        if reason is None and ((result == 0) & (weight != 0)).any():
            return "it would zero non-zero entries of the weight, which unmerge could not restore"
        return reason

    def delta_weight(self, adapter: Adapter) -> Tensor:
        """W_eff − W0, for the additive form the base class uses with dropout or several adapters."""
        return self.merge_weight(adapter, self.weight) - self.weight.to(self.compute_dtype(adapter))

    def delta_forward(self, adapter: Adapter, x: Tensor) -> Tensor:
        """Over a quantized base: with W0 dequantized here and again in backward, by blocks
        of rows for a Linear's hadamard group of an inner LoRA (``ops.hadamard_linear``'s
        blocks, never the whole W0), whole for the others."""
        if self.quantization is None:
            return super().delta_forward(adapter, x)
        if self.kind == "linear" and adapter.group == "hadamard" and adapter.inner == "lora":
            update, quantization, base = adapter.update, self.quantization, self.base_layer
            B, A = update.lora_B.to(x.dtype), update.lora_A.to(x.dtype)
            return hadamard_update_linear(
                x, lambda start, stop: quantization.dequantize_rows(base, start, stop).to(x.dtype), B, A,
                update.scale, adapter.exp, quantization.row_granularity(base),
            )  # fmt: skip
        return self.operation_with_dequantized_weight(x, lambda weight: self.merge_weight(adapter, weight).sub_(weight))

    def embedding_rows(self, adapter: Adapter, x: Tensor) -> Tensor:
        """The rows of W_eff an embedding looks up for indices ``x``, from the same rows of
        W0 and of ΔW (an inner LoRA's rows by lookup in Aᵀ, never forming ΔW)."""
        dtype = self.compute_dtype(adapter)
        rows = self.base_layer(x).to(dtype)
        if adapter.side == "input":  # the rows mix columns of W0: formed whole
            return self.whole_weight_rows(x, self.merge_weight(adapter, self.weight.to(dtype)))
        if adapter.group != "hadamard":
            rotation = ops.matrix_exp(adapter.algebra_element().to(dtype))
            blocks = rows.unflatten(-1, (rotation.shape[0], adapter.block_size))
            return torch.einsum("bij,...bj->...bi", rotation, blocks).flatten(-2)
        update = adapter.update
        if adapter.inner == "lora":
            A = update.lora_A.to(dtype).reshape(update.r, -1)
            delta = update.scale * self.base_operation(x, A) @ update.lora_B.to(dtype).T
        else:
            delta = self.base_operation(x, self.group_action(adapter, torch.ones_like(self.weight, dtype=dtype), False))
            return rows * delta
        return rows * (torch.exp(delta) if adapter.exp == "exact" else 1 + delta)

    def forward(self, x: Tensor) -> Tensor:
        adapter = self.single_active_adapter()
        if adapter is None:
            return super().forward(x)
        if self.is_embedding:
            return self.embedding_rows(adapter, x).to(self.operation_dtype(x))
        if self.kind == "linear" and adapter.group == "hadamard" and adapter.inner == "lora":
            dtype = torch.promote_types(self.weight.dtype, self.compute_dtype(adapter))
            update = adapter.update
            B, A = update.lora_B.to(dtype), update.lora_A.to(dtype)
            return ops.hadamard_linear(x, self.weight, self.bias, B, A, update.scale, adapter.exp)
        rounded = x.dtype == self.weight.dtype  # the merged weight is rounded to it once either way
        return self.operation_with_weight(
            x, lambda: self.merge_weight(adapter, self.weight, rounded=rounded).to(x.dtype)
        )

