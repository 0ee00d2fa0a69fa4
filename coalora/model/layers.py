"""The quantized linear layer with a configuration-aware LoRA adapter (DESIGN §4)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class QuantLoRALinear(nn.Module):
    """``y = Q(W) x + b + scale · B (I + U) A x``.

    ``Q(W)`` is the dequantized weight of the active configuration, fetched in every forward
    from :attr:`weight_source` (set by the owning model, e.g. a look-up in its bounded cache of
    dequantized weights, so no layer holds a dense copy between steps), ``A`` (r×in) and
    ``B`` (out×r) are the LoRA factors shared by all configurations (paper: L2 and L1),
    ``U`` is the r×r adjustment the configuration-aware network produces for this layer
    (paper: U_θ(Q_i)), and ``scale = alpha / r``. ``U = None`` gives plain LoRA.

    Args:
        base: the pre-trained linear layer; its weight and bias are kept, frozen.
        rank: LoRA rank r.
        alpha: LoRA alpha.
        dropout: dropout on the adapter's input.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = (
            None
            if base.bias is None
            else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        )
        self.rank = rank
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default LoRA init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.weight_source: Callable[[], torch.Tensor] | None = None
        self.adjustment: torch.Tensor | None = None

    def init_from_residual(self, residual: torch.Tensor) -> None:
        """LQ-LoRA initialisation: ``scale · B A`` = the best rank-r approximation of ``residual``.

        ``residual = W − Q(W)`` of a reference configuration; B = U√S, A = √S Vᵀ (each divided
        by √scale) from its truncated SVD.
        """
        u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
        root = (s[: self.rank] / self.scale).sqrt()
        with torch.no_grad():
            self.lora_B.copy_(u[:, : self.rank] * root)
            self.lora_A.copy_(root.unsqueeze(1) * vh[: self.rank])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_source is None:
            raise RuntimeError("no quantization configuration is active: call set_configuration")
        out = F.linear(x, self.weight_source(), self.bias)
        # The adapter computes in its own dtype (fp32) whatever the frozen weights' dtype.
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
        if self.adjustment is not None:
            h = h + F.linear(h, self.adjustment)  # h (I + U)ᵀ
        return out + (self.scale * F.linear(h, self.lora_B)).to(out.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"
