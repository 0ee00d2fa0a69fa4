"""llama.cpp tensor types as quantization options: :class:`GGMLConfig` and a weight's GGUF bytes.

A GGML type quantizes each row of a ``(out, in)`` weight on its own, in blocks of
``weights_per_block`` along the row (a GGUF tensor's ``ne[0]`` is ``in``), so a type fits a
matrix only when ``in`` is a multiple of its block: llama.cpp's K-quants need rows of a multiple
of 256 weights, the legacy types a multiple of 32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from coalora.quant.ggml_quants import dequantize_ggml, quantize_ggml
from coalora.quant.ggml_types import GGML_TYPES, GGMLType, ggml_type


@dataclass(frozen=True)
class GGMLConfig:
    """One llama.cpp tensor type as the quantization option of a matrix.

    Args:
        type_name: a name from ``GGML_TYPES`` (``"Q2_K"`` … ``"Q8_0"``).
    """

    type_name: str
    fmt: ClassVar[str] = "gguf"
    FIELD_CHOICES: ClassVar[tuple[tuple, ...]] = (
        tuple(sorted({t.code_bits for t in GGML_TYPES})),
        tuple(sorted({t.scale_bits for t in GGML_TYPES})),
        tuple(sorted({t.sub_block_size for t in GGML_TYPES})),
        tuple(sorted({t.super_block_size or 0 for t in GGML_TYPES})),
        (False, True),
    )
    """The choices of the five fields of :meth:`field_values`: code bits, sub-block scale bits,
    sub-block size, super-block size (0: none) and whether sub-blocks store a minimum."""

    def __post_init__(self) -> None:
        ggml_type(self.type_name)  # raises naming the supported types

    @property
    def kind(self) -> GGMLType:
        return ggml_type(self.type_name)

    @property
    def bits_per_param(self) -> float:
        """Storage per weight from the type's block layout, scales included."""
        return self.kind.bits_per_weight

    def field_values(self) -> tuple:
        """The type's fields in :attr:`FIELD_CHOICES` order (the configuration network's input)."""
        k = self.kind
        return k.code_bits, k.scale_bits, k.sub_block_size, k.super_block_size or 0, k.has_min

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether a weight of ``shape`` ``(out, in)`` can be stored as this type."""
        return len(shape) == 2 and shape[1] > 0 and shape[1] % self.kind.weights_per_block == 0

    def packed_nbytes(self, numel: int) -> int:
        """Bytes of ``numel`` weights stored as this type (rows of whole blocks)."""
        k = self.kind
        return -(-numel // k.weights_per_block) * k.bytes_per_block

    def to_dict(self) -> dict[str, str]:
        return {"fmt": self.fmt, "type_name": self.type_name}

    def __str__(self) -> str:
        return self.type_name


def gguf_space() -> list[GGMLConfig]:
    """The options of ``quant=gguf``: every supported llama.cpp type, in ``GGML_TYPES`` order."""
    return [GGMLConfig(t.name) for t in GGML_TYPES]


@dataclass(frozen=True)
class GGMLTensor:
    """A weight stored as a GGML type: the bytes a GGUF file holds for it.

    Attributes:
        config: the type.
        shape, dtype: of the original ``(out, in)`` weight, restored by :meth:`dequantize`.
        data: uint8 ``(out, row bytes)``, each row its blocks.
    """

    config: GGMLConfig
    shape: torch.Size
    dtype: torch.dtype
    data: torch.Tensor
    FIELDS: ClassVar[tuple[str, ...]] = ("data",)

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def dequantize(self) -> torch.Tensor:
        """The weights the bytes hold, exactly as ``gguf.quants.dequantize`` decodes them."""
        return dequantize_ggml(self.data, self.config.type_name, self.shape, self.dtype)


def quantize_to_ggml(w: torch.Tensor, config: GGMLConfig) -> GGMLTensor:
    """Quantize the ``(out, in)`` weight ``w`` as llama.cpp's reference quantizer does."""
    if not config.fits(w.shape):
        raise ValueError(
            f"a weight of shape {tuple(w.shape)} cannot be stored as {config.type_name}: its "
            f"rows (length {w.shape[-1]}) must be a multiple of {config.kind.weights_per_block}"
        )
    return GGMLTensor(config, w.shape, w.dtype, quantize_ggml(w, config.type_name))
