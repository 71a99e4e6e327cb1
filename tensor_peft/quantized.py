"""Quantized base layers: the one place that knows how to get W0 from a quantized linear
layer, and how to write a new W0 into it with the layer's own quantization settings.

An adapter layer over a quantized base runs the base layer's own forward for W0·x (its
quantized kernel) and adds the adapter's path. Methods whose update does not involve W0
(LoRA, MTLoRA, FLoRA, SNELL/SNELLA) never dequantize it; LieRA's W0 ⊙ (…) dequantizes it
in its forward and again in backward, for its hadamard group one block of rows at a time
(``dequantize_rows``, blocks starting at multiples of ``row_granularity``), so that no
dequantized copy of the whole W0 exists (torchao tensors other than ``Int8Tensor``:
dequantized whole). Merging dequantizes, adds ΔW and quantizes again
(``requantize``).

Supported (``quantization_of``): bitsandbytes ``Linear4bit`` (nf4, fp4, with or without
double quantization, any blocksize) and ``Linear8bitLt`` with int8 weights
(``has_fp16_weights=False``); an ``nn.Linear`` whose weight is a torchao quantized tensor
(any one with ``dequantize()``; merging back requantizes torchao's ``Int8Tensor``, per row
or per tensor). Neither library is imported before a module of theirs is met: a module
can only be one of their types if its library is loaded already."""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor, nn


class RequantizationWarning(UserWarning):
    """A merge quantized the merged weight again: the layer holds W0 + ΔW up to rounding."""


class QuantizedLinear:
    """How to read and write the weight of one type of quantized linear layer (stateless;
    every method takes the layer)."""

    name = ""

    def dequantize(self, layer: nn.Module) -> Tensor:
        """W0 ``(out, in)`` in the layer's full-precision dtype, computed by the library."""
        raise NotImplementedError

    def row_granularity(self, layer: nn.Module) -> int:
        """The row counts ``dequantize_rows`` can start a block at are its multiples (here:
        all the rows, the whole weight at once)."""
        return layer.out_features

    def dequantize_rows(self, layer: nn.Module, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``dequantize(layer)``, the same values, with ``start`` a
        multiple of ``row_granularity`` and ``stop`` too or the row count."""
        return self.dequantize(layer)[start:stop]

    def forward(self, layer: nn.Module, x: Tensor) -> Tensor:
        """W0·x by the layer's own forward."""
        return layer(x)

    def requantize_refusal(self, layer: nn.Module) -> str | None:
        """Why a new weight cannot be quantized back into ``layer``, or None."""
        return None

    def requantize(self, layer: nn.Module, weight: Tensor) -> None:
        """Replace the layer's weight by ``weight`` quantized with the layer's own settings."""
        raise NotImplementedError

    def full_precision(self, layer: nn.Module, weight: Tensor) -> nn.Linear:
        """An ``nn.Linear`` with ``weight`` and the layer's bias (for export)."""
        out_features, in_features = weight.shape
        bias = getattr(layer, "bias", None)
        linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        linear.requires_grad_(False)
        return linear.train(layer.training)


class Bnb4bit(QuantizedLinear):
    """bitsandbytes ``Linear4bit`` (and its ``LinearNF4``/``LinearFP4``)."""

    name = "bitsandbytes Linear4bit"

    def forward(self, layer: nn.Module, x: Tensor) -> Tensor:
        """The layer's forward, with the weight kept in bitsandbytes' standard layout: on
        CPUs with AVX512-BF16 its inference forward would repack it for a kernel that
        rounds the scales to bfloat16, has no backward, and cannot be dequantized exactly."""
        repacks = getattr(layer, "support_avx512bf16_for_cpu", False)
        if not repacks:
            return layer(x)
        layer.support_avx512bf16_for_cpu = False
        try:
            return layer(x)
        finally:
            layer.support_avx512bf16_for_cpu = repacks

    def dequantize(self, layer: nn.Module) -> Tensor:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(layer.weight.data, layer.weight.quant_state)

    def row_granularity(self, layer: nn.Module) -> int:
        """Rows whose entries fill whole 4-bit blocks, and with double quantization whole
        blocks of their nested absmax too; all the rows where a row is not a whole number
        of 4-bit blocks (there bitsandbytes' CPU kernel does not scale a row by the absmax
        of the flat blocks its entries fall in, so a slice of rows, which starts a new
        count, would not give the whole dequantization's values)."""
        state = layer.weight.quant_state
        if layer.in_features % state.blocksize:
            return layer.out_features
        entries = state.blocksize * (state.state2.blocksize if state.nested else 1)
        return entries // math.gcd(entries, layer.in_features)

    def dequantize_rows(self, layer: nn.Module, start: int, stop: int) -> Tensor:
        """The rows' packed bytes dequantized with their absmax (nested: the absmax of
        those rows dequantized first), by the library's calls on the slices."""
        from bitsandbytes.functional import QuantState, dequantize_4bit, dequantize_blockwise

        state, columns = layer.weight.quant_state, layer.in_features
        first, last = start * columns, stop * columns  # entries; whole 4-bit blocks (row_granularity)
        blocks = slice(first // state.blocksize, -(-last // state.blocksize))
        absmax = state.absmax[blocks]
        if state.nested:
            nested = state.state2
            nested_slice = QuantState(absmax=nested.absmax[blocks.start // nested.blocksize:
                                                            -(-blocks.stop // nested.blocksize)],
                                      code=nested.code, blocksize=nested.blocksize, dtype=torch.float32)  # fmt: skip
            absmax = dequantize_blockwise(absmax, nested_slice) + state.offset
        packed = layer.weight.data.reshape(-1).view(torch.uint8)[first // 2 : -(-last // 2)]  # two entries a byte
        rows = QuantState(absmax=absmax, shape=torch.Size((stop - start, columns)), code=state.code,
                          blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)  # fmt: skip
        return dequantize_4bit(packed.reshape(-1, 1), rows)

    def requantize(self, layer: nn.Module, weight: Tensor) -> None:
        old = layer.weight
        new = type(old)(
            weight.detach().to(old.quant_state.dtype), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
            module=layer,
        )  # fmt: skip
        layer.weight = new.to(weight.device)  # moving it quantizes it (and sets layer.quant_state)


class Bnb8bit(QuantizedLinear):
    """bitsandbytes ``Linear8bitLt`` holding int8 weights (row-wise absmax scales)."""

    name = "bitsandbytes Linear8bitLt"

    @staticmethod
    def scales(layer: nn.Module) -> Tensor:
        """The per-row scales: on the weight until the first forward moves them to the state."""
        return layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB

    def dequantize(self, layer: nn.Module) -> Tensor:
        from bitsandbytes.functional import int8_vectorwise_dequant

        return int8_vectorwise_dequant(layer.weight.data, self.scales(layer))

    def row_granularity(self, layer: nn.Module) -> int:
        return 1  # one scale a row

    def dequantize_rows(self, layer: nn.Module, start: int, stop: int) -> Tensor:
        from bitsandbytes.functional import int8_vectorwise_dequant

        return int8_vectorwise_dequant(layer.weight.data[start:stop], self.scales(layer)[start:stop])

    def requantize(self, layer: nn.Module, weight: Tensor) -> None:
        from bitsandbytes.functional import int8_vectorwise_quant

        quantized, scales, _ = int8_vectorwise_quant(weight.detach().to(torch.float16))
        old = layer.weight
        layer.weight = type(old)(quantized, requires_grad=False, has_fp16_weights=False, CB=quantized, SCB=scales)
        layer.state.CB = layer.state.SCB = None  # the next forward takes them from the weight


class TorchAOWeight(QuantizedLinear):
    """An ``nn.Linear`` whose weight is a torchao quantized tensor."""

    name = "torchao"

    def dequantize(self, layer: nn.Module) -> Tensor:
        return layer.weight.dequantize()

    def row_granularity(self, layer: nn.Module) -> int:
        """Any row for an ``Int8Tensor`` per row or per tensor (a slice of its rows is one
        with those rows' scales); all the rows, the whole weight, for other tensors."""
        return 1 if self.granularity(layer) is not None else layer.out_features

    def dequantize_rows(self, layer: nn.Module, start: int, stop: int) -> Tensor:
        if self.granularity(layer) is None:
            return super().dequantize_rows(layer, start, stop)
        return layer.weight[start:stop].dequantize()

    def granularity(self, layer: nn.Module):
        """The torchao granularity of an ``Int8Tensor`` weight's blocks, or None for others."""
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerRow, PerTensor

        weight = layer.weight
        if not isinstance(weight, Int8Tensor):
            return None
        if list(weight.block_size) == [1, weight.shape[1]]:
            return PerRow()
        if list(weight.block_size) == list(weight.shape):
            return PerTensor()
        return None

    def requantize_refusal(self, layer: nn.Module) -> str | None:
        if self.granularity(layer) is None:
            return (
                f"quantizing back into a torchao {type(layer.weight).__name__} is supported for Int8Tensor per row "
                "or per tensor only"
            )
        return None

    def requantize(self, layer: nn.Module, weight: Tensor) -> None:
        old = layer.weight
        new = type(old).from_hp(
            weight.detach().to(old.dtype), self.granularity(layer), act_quant_kwargs=old.act_quant_kwargs
        )
        layer.weight = nn.Parameter(new, requires_grad=False)


BNB_4BIT, BNB_8BIT, TORCHAO = Bnb4bit(), Bnb8bit(), TorchAOWeight()


def quantization_of(module: nn.Module) -> QuantizedLinear | None:
    """How to read and write ``module``'s quantized weight; None for a module that is not a
    quantized linear layer (a subclass with a forward of its own is not one: what it computes
    is unknown). Raises a TypeError saying why for a bitsandbytes layer the adapters cannot
    wrap."""
    bnb = sys.modules.get("bitsandbytes.nn")
    forward = type(module).forward
    if bnb is not None and isinstance(module, bnb.Linear4bit) and forward is bnb.Linear4bit.forward:
        if not getattr(module.weight, "bnb_quantized", False):
            raise TypeError("Linear4bit's weight is not quantized yet: move the layer to its device first")
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            raise TypeError(
                "Linear4bit's weight is in bitsandbytes' CPU inference layout (the layer ran in inference mode on "
                "this CPU), which cannot be dequantized exactly: adapt the layer before running it in inference mode"
            )
        return BNB_4BIT
    if bnb is not None and isinstance(module, bnb.Linear8bitLt) and forward is bnb.Linear8bitLt.forward:
        if module.weight.dtype != torch.int8:
            raise TypeError(
                "Linear8bitLt holds a full-precision weight (has_fp16_weights=True, or not moved to its device yet): "
                "adapters wrap it once its weight is int8"
            )
        return BNB_8BIT
    torchao = sys.modules.get("torchao.utils")
    weight = getattr(module, "weight", None)
    if torchao is not None and isinstance(weight, torchao.TorchAOBaseTensor) and type(module) is nn.Linear:
        return TORCHAO
    return None
