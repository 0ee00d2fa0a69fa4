"""A served linear layer: packed quantized weight, dequantized per call, plus a plain LoRA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coalora.model.layers import QuantizedLinearFunction
from coalora.quant import Option, PackedTensor
from coalora.quant.options import packed_tensor, tensor_fields


class PackedLoRALinear(nn.Module):
    """``y = Q(W) x + b + scale · B' A x`` with ``Q(W)`` kept packed.

    The weight is held as the tensors of a :class:`~coalora.quant.PackedTensor` (codes and
    double-quantized scales, or a llama.cpp type's bytes; buffers, so ``state_dict`` and
    ``.to`` see them) and dequantized in every ``forward``; no dense copy stays resident.
    ``B' = B (I + U)`` is the LoRA factor with the configuration-aware adjustment of this
    configuration folded in, so the adapter is a standard LoRA.

    Args:
        weight: the quantized weight.
        bias: the pre-trained bias, or ``None``.
        lora_A: (r, in) LoRA factor.
        lora_B: (out, r) LoRA factor, adjustment folded in.
        scale: LoRA scale ``alpha / r``.
    """

    def __init__(
        self,
        weight: PackedTensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scale: float,
    ) -> None:
        super().__init__()
        self.config: Option = weight.config
        self.weight_shape = weight.shape
        self.weight_dtype = weight.dtype
        self.out_features, self.in_features = weight.shape
        for name, tensor in tensor_fields(weight).items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)
        self.lora_B = nn.Parameter(lora_B, requires_grad=False)
        self.scale = scale

    @property
    def quantized(self) -> PackedTensor:
        """The packed weight (codes and scales, or a llama.cpp type's bytes)."""
        fields = dict(self.named_buffers(recurse=False))
        return packed_tensor(self.config, self.weight_shape, self.weight_dtype, fields)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = QuantizedLinearFunction.apply(x, self.quantized, self.bias)
        return out + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def extra_repr(self) -> str:
        rank = len(self.lora_A)
        return f"in={self.in_features}, out={self.out_features}, {self.config}, rank={rank}"
