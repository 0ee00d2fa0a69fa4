"""Bit packing of unsigned codes: ``bits`` bits per code, no padding between codes."""

from __future__ import annotations

import torch

MAX_BITS = 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} cannot be packed; choose 1 to {MAX_BITS}")


def _word_dtype(bits: int) -> torch.dtype:
    """Integer dtype that holds 8 codes (``8 · bits`` bits) as a non-negative value."""
    return torch.int32 if 8 * bits < 32 else torch.int64


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat tensor of codes in ``[0, 2^bits)`` into a flat uint8 tensor.

    The first code takes the lowest bits. The number of codes must be a multiple of 8 (callers
    pad blocks to that; every block and scale-group size in the configuration space is a
    multiple of 16).
    """
    _check_bits(bits)
    if codes.numel() % 8:
        raise ValueError(f"pack needs a multiple of 8 codes, got {codes.numel()}")
    if 8 % bits == 0:  # 1, 2, 4 or 8 bits: whole codes per byte
        per_byte = 8 // bits
        grouped = codes.to(torch.uint8).view(-1, per_byte)
        out = grouped[:, 0].clone()
        for i in range(1, per_byte):
            out |= grouped[:, i] << (bits * i)
        return out
    # Other widths: 8 codes make one word of exactly `bits` bytes.
    grouped = codes.view(-1, 8)
    word = grouped[:, 0].to(_word_dtype(bits))
    for i in range(1, 8):
        word |= grouped[:, i].to(word.dtype) << (bits * i)
    byte_shifts = torch.arange(bits, dtype=word.dtype, device=codes.device) * 8
    return (word.unsqueeze(1) >> byte_shifts).to(torch.uint8).view(-1)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` codes as int32."""
    _check_bits(bits)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
        codes = (packed.view(-1, 1) >> shifts) & mask
        return codes.view(-1)[:count].int()
    grouped = packed.view(-1, bits)
    word = grouped[:, 0].to(_word_dtype(bits))
    for k in range(1, bits):
        word |= grouped[:, k].to(word.dtype) << (8 * k)
    shifts = torch.arange(8, dtype=word.dtype, device=packed.device) * bits
    codes = (word.unsqueeze(1) >> shifts).bitwise_and_(mask)
    return codes.view(-1)[:count].int()
