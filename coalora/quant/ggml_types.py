"""llama.cpp (GGML) tensor types: block layouts and the numbers a network can take as features."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType


@dataclass(frozen=True)
class GGMLType:
    """One GGML quantized tensor type (the layout of ``block_<name>`` in ggml-common.h).

    Args:
        name: the llama.cpp name, e.g. ``"Q4_K"``.
        gguf_type: the matching ``gguf.GGMLQuantizationType`` member.
        weights_per_block: weights in one stored block (a super-block for the K-quants).
        bytes_per_block: bytes of one stored block, scales included.
        code_bits: bits of each weight's integer code.
        sub_block_size: weights sharing one scale (and minimum).
        super_block_size: weights sharing the fp16 super-scales, or ``None`` for the legacy types.
        scale_bits: bits of each sub-block scale (16 where it is an fp16 number).
        has_min: whether each sub-block also stores a minimum (``w = d*q - m``, not ``w = d*q``).
    """

    name: str
    gguf_type: GGMLQuantizationType
    weights_per_block: int
    bytes_per_block: int
    code_bits: int
    sub_block_size: int
    super_block_size: int | None
    scale_bits: int
    has_min: bool

    @property
    def bits_per_weight(self) -> float:
        """Storage cost per weight, scales included: ``8 * bytes_per_block / weights_per_block``."""
        return 8 * self.bytes_per_block / self.weights_per_block


def _ggml_type(
    name: str,
    bytes_per_block: int,
    code_bits: int,
    sub_block_size: int,
    super_block_size: int | None,
    scale_bits: int,
    has_min: bool,
) -> GGMLType:
    """Build a type, checking its block against ``gguf.GGML_QUANT_SIZES``."""
    gguf_type = GGMLQuantizationType[name]
    weights_per_block = super_block_size or sub_block_size
    if GGML_QUANT_SIZES[gguf_type] != (weights_per_block, bytes_per_block):
        raise RuntimeError(
            f"gguf gives {name} blocks of (weights, bytes) = {GGML_QUANT_SIZES[gguf_type]}, "
            f"this module expects {(weights_per_block, bytes_per_block)}"
        )
    return GGMLType(
        name,
        gguf_type,
        weights_per_block,
        bytes_per_block,
        code_bits,
        sub_block_size,
        super_block_size,
        scale_bits,
        has_min,
    )


FP16_BYTES = 2
"""Bytes of one fp16 scale (``ggml_half``)."""

# Byte counts spelled as the fields of each ggml-common.h struct, in storage order.
GGML_TYPES: tuple[GGMLType, ...] = (
    # scales[16] (4-bit scale | 4-bit min), qs[64], d, dmin
    _ggml_type("Q2_K", QK_K // 16 + QK_K // 4 + 2 * FP16_BYTES, 2, 16, QK_K, 4, True),
    # hmask[32], qs[64], scales[12] (6-bit), d
    _ggml_type("Q3_K", QK_K // 8 + QK_K // 4 + 12 + FP16_BYTES, 3, 16, QK_K, 6, False),
    # d, dmin, scales[12] (6-bit scale and min), qs[128]
    _ggml_type("Q4_K", 2 * FP16_BYTES + 12 + QK_K // 2, 4, 32, QK_K, 6, True),
    # d, dmin, scales[12], qh[32], qs[128]
    _ggml_type("Q5_K", 2 * FP16_BYTES + 12 + QK_K // 8 + QK_K // 2, 5, 32, QK_K, 6, True),
    # ql[128], qh[64], scales[16] (int8), d
    _ggml_type("Q6_K", QK_K // 2 + QK_K // 4 + QK_K // 16 + FP16_BYTES, 6, 16, QK_K, 8, False),
    # d, qs[16]
    _ggml_type("Q4_0", FP16_BYTES + 16, 4, 32, None, 16, False),
    # d, qh[4], qs[16]
    _ggml_type("Q5_0", FP16_BYTES + 4 + 16, 5, 32, None, 16, False),
    # d, qs[32] (int8)
    _ggml_type("Q8_0", FP16_BYTES + 32, 8, 32, None, 16, False),
)

_BY_NAME = {t.name: t for t in GGML_TYPES}


def ggml_type(name: str) -> GGMLType:
    """The supported GGML type called ``name`` (e.g. ``"Q4_K"``)."""
    if name not in _BY_NAME:
        raise ValueError(f"GGML type {name!r} is not supported; choose one of {sorted(_BY_NAME)}")
    return _BY_NAME[name]
