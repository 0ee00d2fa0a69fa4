"""The quantized linear layer with a configuration-aware LoRA adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from coalora.model.weight_cache import QuantizedWeightCache
from coalora.quant import Option, PackedTensor, QuantConfig, quantize
from coalora.quant.options import packed_tensor, tensor_fields

Storage = Literal["dense", "int8", "packed"]
"""How a layer holds its frozen weight:

- ``dense``: the pre-trained weight in the model's dtype, the master every option is
  quantized from;
- ``int8``: that master quantized once with :data:`INT8_MASTER` (8.625 bits per weight,
  about half of bf16), every option quantized from its dequantization;
- ``packed``: only the packed codes and scales of one fixed option (QLoRA's storage), for
  methods that train a single configuration.
"""
STORAGES: tuple[Storage, ...] = ("dense", "int8", "packed")

INT8_MASTER = QuantConfig(8, 8, "fp32", 16, 16, "int")
"""The 8-bit master: symmetric int8 codes in blocks of 16 weights, 8-bit first-level scales in
groups of 16 with fp32 second-level scales (the widest option of the integer space)."""

UNQUANTIZED = "unquantized"
"""A layer configuration that computes with the dense master itself (reference runs)."""


@dataclass(frozen=True)
class ResidualFactors:
    """``left @ right``: the best rank-k approximation of a quantization residual
    ``W − Q(W)`` (``left`` out×k, ``right`` k×in, float32)."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def nbytes(self) -> int:
        return (self.left.numel() + self.right.numel()) * self.left.element_size()


def residual_factors(weight: torch.Tensor, quantized: PackedTensor, rank: int) -> ResidualFactors:
    """The rank-``rank`` truncated SVD of ``weight − quantized`` as :class:`ResidualFactors`
    (``left = U√S``, ``right = √S Vᵀ``); exact and deterministic. Built outside inference
    mode (validation runs in it), so training may back-propagate through the factors later."""
    with torch.inference_mode(False), torch.no_grad():
        residual = weight.float() - quantized.dequantize().float()
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = s[:rank].sqrt()
        return ResidualFactors(u[:, :rank] * root, root.unsqueeze(1) * vh[:rank])


def check_residual_rank(residual_rank: object, limit: int) -> None:
    """``residual_rank`` must be an integer in [0, ``limit``] (0: no correction)."""
    if (
        isinstance(residual_rank, bool)
        or not isinstance(residual_rank, int)
        or not 0 <= residual_rank <= limit
    ):
        raise ValueError(
            f"residual_rank={residual_rank!r} must be an integer in [0, {limit}] (0: no "
            "correction; at most the smallest dimension of a target matrix)"
        )


class QuantizedLinearFunction(torch.autograd.Function):
    """``y = x Q(W)ᵀ + b`` from packed ``Q(W)``, dequantized into a transient buffer in the
    forward pass and again in the backward pass (as bitsandbytes' 4-bit matmul does): no dense
    weight is saved for backward, only the packed tensor that produced it. The weight and bias
    are frozen: the only gradient is the input's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: PackedTensor, bias: torch.Tensor | None):
        ctx.weight = weight
        return F.linear(x, weight.dequantize().to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad_out @ ctx.weight.dequantize().to(grad_out.dtype), None, None


class QuantLoRALinear(nn.Module):
    """``y = Q(W) x + b + scale · B (I + U) A x`` (``+ L_Q R_Q x`` with a residual rank).

    ``Q(W)`` is the frozen weight under the layer's active option :attr:`config` (set by the
    owning model at every configuration switch), quantized from the layer's storage (through
    :attr:`cache`, the model's bounded cache of packed weights, when set) and dequantized
    transiently in each forward and backward pass (:class:`QuantizedLinearFunction`). ``A``
    (r×in) and ``B`` (out×r) are the LoRA factors shared by all configurations (paper: L2 and
    L1), :attr:`adjustment` is the r×r matrix U the configuration-aware network produces for
    this layer (paper: U_θ(Q_i)), and ``scale = alpha / r``. ``adjustment = None`` gives plain LoRA.

    With ``residual_rank`` k > 0, each option Q also gets its own frozen correction ``L_Q R_Q``,
    the rank-k SVD of ``W − Q(W)`` (:meth:`residual`; the paper's configuration-dependent SVD
    initialisation, which a shared trained ``B A`` cannot be): it is computed once per option
    and kept in :attr:`cache` beside the packed weight, and the served adapter of Q is then the
    rank-(r + k) LoRA of :meth:`plain_lora`. The layer also keeps the factors of the option
    it last used, so a correction the cache cannot hold costs one SVD per configuration
    switch, not one per forward pass.

    Args:
        base: the pre-trained linear layer; its weight and bias are kept, frozen.
        rank: LoRA rank r.
        alpha: LoRA alpha.
        dropout: dropout on the adapter's input.
        residual_rank: k, the rank of each option's residual correction (0: none).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        residual_rank: int = 0,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        check_residual_rank(residual_rank, min(base.weight.shape))
        if residual_rank and not alpha > 0:
            raise ValueError(f"alpha={alpha!r} must be > 0 with a residual correction")
        self.residual_rank = residual_rank
        self._last_residual: tuple[tuple, ResidualFactors] | None = None
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight_shape, self.weight_dtype = base.weight.shape, base.weight.dtype
        self.weight: nn.Parameter | None = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = (
            None
            if base.bias is None
            else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        )
        self.rank = rank
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default LoRA init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.storage: Storage = "dense"
        self.stored_config: Option | None = None
        self.config: Option | str | None = None
        self.adjustment: torch.Tensor | None = None
        self.cache: QuantizedWeightCache | None = None

    @property
    def stored(self) -> PackedTensor:
        """The packed tensor this layer stores (``int8`` and ``packed`` storage)."""
        if self.stored_config is None:
            raise RuntimeError("this layer stores its weight dense; it has no packed tensor")
        return packed_tensor(
            self.stored_config,
            self.weight_shape,
            self.weight_dtype,
            dict(self.named_buffers(recurse=False)),
        )

    def store(self, storage: Storage, config: Option | None = None) -> None:
        """Replace the dense master by ``storage`` (``int8``, or ``packed`` with ``config``).

        The packed tensors are non-persistent buffers: checkpoints never hold frozen weights.
        """
        if storage not in STORAGES:
            raise ValueError(f"storage={storage!r}; choose one of {STORAGES}")
        if self.storage != "dense":
            raise RuntimeError(f"this layer already stores its weight as {self.storage!r}")
        if storage == "dense":
            return
        if storage == "packed" and config is None:
            raise ValueError("packed storage needs the option to keep")
        config = INT8_MASTER if storage == "int8" else config
        for name, tensor in tensor_fields(quantize(self.weight, config)).items():
            self.register_buffer(name, tensor, persistent=False)
        self.weight = None
        self.storage, self.stored_config = storage, config

    def master(self) -> torch.Tensor:
        """The dense weight every option is quantized from (dequantized for ``int8``)."""
        if self.storage == "dense":
            return self.weight
        if self.storage == "int8":
            return self.stored.dequantize()
        raise RuntimeError(
            f"this layer keeps only option {self.stored_config} packed; it cannot be "
            "requantized under another option"
        )

    def quantized(self, config: Option) -> PackedTensor:
        """The frozen weight quantized with ``config``: the stored tensor for ``packed``
        storage, else quantized from the master (through :attr:`cache` when set)."""
        if self.storage == "packed" and config == self.stored_config:
            return self.stored
        if self.cache is None:
            return quantize(self.master(), config)
        return self.cache.get(self.cache_key(config), lambda: quantize(self.master(), config))

    def cache_key(self, config: Option) -> tuple:
        """This layer's key in :attr:`cache` for ``config`` (on the layer's current device)."""
        return id(self), config, str(self.lora_A.device)

    def residual_key(self, config: Option) -> tuple:
        """The key of ``config``'s :class:`ResidualFactors` in :attr:`cache`."""
        return *self.cache_key(config), "residual", self.residual_rank

    def residual_nbytes(self) -> int:
        """Bytes of one option's :class:`ResidualFactors` (float32)."""
        return 4 * self.residual_rank * (self.in_features + self.out_features)

    def residual(self, config: Option) -> ResidualFactors:
        """The frozen rank-k correction of ``config``: the SVD of ``W − Q(W)`` (through
        :attr:`cache` when set)."""
        if not self.residual_rank:
            raise RuntimeError("this layer has no residual correction (residual_rank=0)")

        key = self.residual_key(config)
        if self._last_residual is not None and self._last_residual[0] == key:
            return self._last_residual[1]

        def build() -> ResidualFactors:
            return residual_factors(self.master(), self.quantized(config), self.residual_rank)

        factors = build() if self.cache is None else self.cache.get(key, build)
        self._last_residual = key, factors
        return factors

    def forget_residual(self) -> None:
        """Drop the kept factors (after the master weight changes)."""
        self._last_residual = None

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
        if self.config is None:
            raise RuntimeError("no quantization configuration is active: call set_configuration")
        if self.config == UNQUANTIZED:
            out = F.linear(x, self.master(), self.bias)
        else:
            out = QuantizedLinearFunction.apply(x, self.quantized(self.config), self.bias)
        # The adapter computes in its own dtype (fp32) whatever the frozen weights' dtype.
        x = x.to(self.lora_A.dtype)
        h = F.linear(self.dropout(x), self.lora_A)
        if self.adjustment is not None:
            h = h + F.linear(h, self.adjustment)  # h (I + U)ᵀ
        delta = self.scale * F.linear(h, self.lora_B)
        if self.residual_rank and self.config != UNQUANTIZED:
            factors = self.residual(self.config)
            delta = delta + F.linear(F.linear(x, factors.right), factors.left)
        return out + delta.to(out.dtype)

    def folded_lora_B(self, adjustment: torch.Tensor | None) -> torch.Tensor:
        """``B (I + U)`` for the r×r ``adjustment`` U (``B`` itself for plain LoRA): the factor
        that, with ``A``, gives this configuration's adapter as plain LoRA."""
        b = self.lora_B.detach()
        return b if adjustment is None else b + b @ adjustment

    def plain_lora(
        self, adjustment: torch.Tensor | None, config: Option
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A', B')`` with ``scale · B' A'`` = this layer's whole adapter under ``config`` and
        ``adjustment`` (detached): ``(A, B (I + U))``, with the residual correction appended
        as k more rows of ``A'`` and columns of ``B'`` when ``residual_rank`` is set."""
        a, b = self.lora_A.detach(), self.folded_lora_B(adjustment)
        if not self.residual_rank:
            return a, b
        factors = self.residual(config)
        return torch.cat([a, factors.right]), torch.cat([b, factors.left / self.scale], dim=1)

    def frozen_nbytes(self) -> int:
        """Bytes of the frozen weight as stored (dense master or packed tensors)."""
        if self.storage == "dense":
            return self.weight.numel() * self.weight.element_size()
        return self.stored.nbytes

    def extra_repr(self) -> str:
        stored = f", {self.storage} {self.stored_config}" if self.stored_config else ""
        residual = f", residual_rank={self.residual_rank}" if self.residual_rank else ""
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}{residual}{stored}"
