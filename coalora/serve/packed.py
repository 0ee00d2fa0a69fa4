"""A served linear layer: packed quantized weight, dequantized per call, plus a plain LoRA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coalora.model.layers import QuantizedLinearFunction
from coalora.quant import QuantConfig, QuantizedTensor
from coalora.quant.tensor import PACKED_FIELDS, TORCH_SCALE_DTYPES


def packed_layout(
    numel: int, config: QuantConfig
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each packed tensor (:data:`PACKED_FIELDS`) that :func:`quantize`
    stores for ``numel`` weights under ``config``: codes and first-level scale codes padded to
    whole blocks and scale groups, one second-level scale per group, one fp32 offset. Their
    bytes add up to :func:`coalora.quant.tensor.packed_nbytes`."""
    blocks = -(-numel // config.block_size)
    groups = -(-blocks // config.scale_block_size)
    return {
        "codes": ((blocks * config.block_size * config.bits // 8,), torch.uint8),
        "scale_codes": ((groups * config.scale_block_size * config.scale_bits // 8,), torch.uint8),
        "second_scales": ((groups,), TORCH_SCALE_DTYPES[config.scale_dtype]),
        "offset": ((), torch.float32),
    }


class PackedLoRALinear(nn.Module):
    """``y = Q(W) x + b + scale · B' A x`` with ``Q(W)`` kept packed.

    The weight is held as the packed codes and double-quantized scales of a
    :class:`QuantizedTensor` (buffers, so ``state_dict`` and ``.to`` see them) and dequantized
    in every ``forward``; no dense copy stays resident. ``B' = B (I + U)`` is the LoRA factor
    with the configuration-aware adjustment of this configuration folded in (DESIGN §9), so the
    adapter is a standard LoRA.

    Args:
        weight: the quantized weight.
        bias: the pre-trained bias, or ``None``.
        lora_A: (r, in) LoRA factor.
        lora_B: (out, r) LoRA factor, adjustment folded in.
        scale: LoRA scale ``alpha / r``.
    """

    def __init__(
        self,
        weight: QuantizedTensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scale: float,
    ) -> None:
        super().__init__()
        self.config: QuantConfig = weight.config
        self.weight_shape = weight.shape
        self.weight_dtype = weight.dtype
        self.out_features, self.in_features = weight.shape
        for name in PACKED_FIELDS:
            self.register_buffer(name, getattr(weight, name))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)
        self.lora_B = nn.Parameter(lora_B, requires_grad=False)
        self.scale = scale

    @property
    def quantized(self) -> QuantizedTensor:
        """The packed weight as a :class:`QuantizedTensor`."""
        return QuantizedTensor(
            self.config,
            self.weight_shape,
            self.weight_dtype,
            *(getattr(self, name) for name in PACKED_FIELDS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = QuantizedLinearFunction.apply(x, self.quantized, self.bias)
        return out + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def extra_repr(self) -> str:
        rank = len(self.lora_A)
        return f"in={self.in_features}, out={self.out_features}, {self.config}, rank={rank}"
