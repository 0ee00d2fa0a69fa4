"""Bit packing of unsigned codes: ``bits`` bits per code, no padding between codes."""

from __future__ import annotations

import torch


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a flat tensor of codes in ``[0, 2^bits)`` into a flat uint8 tensor.

    The number of codes must be a multiple of 8 (callers pad blocks to that; every block and
    scale-group size in the configuration space is a multiple of 16).
    """
    if codes.numel() % 8:
        raise ValueError(f"pack needs a multiple of 8 codes, got {codes.numel()}")
    if 8 % bits == 0:  # 1, 2, 4 or 8 bits: whole codes per byte
        per_byte = 8 // bits
        grouped = codes.to(torch.uint8).view(-1, per_byte)
        out = grouped[:, 0].clone()
        for i in range(1, per_byte):
            out |= grouped[:, i] << (bits * i)
        return out
    # Other widths: 8 codes make exactly `bits` bytes.
    grouped = codes.to(torch.int64).view(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (grouped << shifts).sum(dim=1)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    return ((word.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).view(-1)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` codes as int64."""
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=packed.device) * bits
        mask = (1 << bits) - 1
        codes = (packed.view(-1, 1) >> shifts) & mask
        return codes.view(-1)[:count].long()
    grouped = packed.to(torch.int64).view(-1, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (grouped << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.view(-1)[:count]
