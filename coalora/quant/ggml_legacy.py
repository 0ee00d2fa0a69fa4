"""Q4_0, Q5_0 and Q8_0 blocks of 32 weights, as ggml-quants.c writes and gguf's numpy reads them.

Every function takes ``blocks``: one block per row, fp32 weights ``(n, 32)`` or uint8 bytes
``(n, bytes_per_block)``. The fp16 scale helpers here are shared with the K-quants.
"""

from __future__ import annotations

import torch

from coalora.quant.ggml_types import FP16_BYTES


def fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """``GGML_FP32_TO_FP16`` (ties to even) of ``d`` ``(n, k)``, little-endian bytes ``(n, 2k)``."""
    return d.to(torch.float16).contiguous().view(torch.uint8)


def fp16_round(d: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(d))``: the scale the decoder will see."""
    return d.to(torch.float16).float()


def fp16_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 number stored at byte ``offset`` of each block, as fp32 ``(n, 1)``."""
    return blocks[:, offset : offset + FP16_BYTES].contiguous().view(torch.float16).float()


def constant(like: torch.Tensor, value: float) -> torch.Tensor:
    """``value`` as an fp32 scalar tensor on ``like``'s device, to divide by or into.

    Tensor by tensor is a true IEEE division, as in C; torch computes ``number / tensor`` as a
    reciprocal times the number, and on CUDA ``tensor / number`` as the tensor times a reciprocal,
    either of which can differ from the division in the last bit.
    """
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def signed_absmax(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The signed value of largest magnitude along ``dim`` (kept), the first one on ties.

    As the C loop ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` starting at 0: an
    all-zero row gives +0 whatever the sign of its zeros.
    """
    peak = values.gather(dim, values.abs().argmax(dim, keepdim=True))
    return torch.where(peak != 0, peak, torch.zeros_like(peak))


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes ``(n, 32)``: byte ``j`` holds code ``j`` low and code ``j + 16`` high."""
    return (codes[:, :16] & 0xF) | ((codes[:, 16:] & 0xF) << 4)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_nibbles`, codes ``(n, 32)``."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _symmetric_codes(blocks: torch.Tensor, half_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_row_q{4,5}_0_ref``: ``d = max / -half_levels``, codes ``[0, 2 half_levels)``."""
    d = signed_absmax(blocks) / -half_levels  # exact: a power of two
    inverse = torch.where(d != 0, constant(d, 1.0) / d, torch.zeros_like(d))
    # (int8_t)(x*id + h.5) truncates toward zero; x*id >= -h - tiny so the sum stays above 0.
    codes = torch.trunc(blocks * inverse + (half_levels + 0.5)).clamp(0, 2 * half_levels - 1)
    return d, codes.to(torch.int32)


def quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """``block_q4_0``: d, qs[16] with ``w = d * (q - 8)``."""
    d, codes = _symmetric_codes(blocks, 8)
    return torch.cat([fp16_bytes(d), _nibbles(codes).to(torch.uint8)], dim=-1)


def quantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """``block_q5_0``: d, qh[4] (bit ``j``: code ``j``'s 5th bit), qs[16]; ``w = d * (q - 16)``."""
    d, codes = _symmetric_codes(blocks, 16)
    bit = torch.arange(8, device=blocks.device, dtype=torch.int32)
    high = ((codes >> 4).view(-1, 4, 8) << bit).sum(-1)
    return torch.cat([fp16_bytes(d), high.to(torch.uint8), _nibbles(codes).to(torch.uint8)], dim=-1)


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: nearest integer, halves away from zero (``torch.round`` goes to even)."""
    whole = torch.trunc(x)
    return whole + torch.sign(x) * ((x - whole).abs() >= 0.5)


def quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """``block_q8_0``: d, qs[32] (int8) with ``w = d * q`` and ``d = max|w| / 127``."""
    d = blocks.abs().amax(-1, keepdim=True) / constant(blocks, 127.0)
    inverse = torch.where(d != 0, constant(d, 1.0) / d, torch.zeros_like(d))
    codes = roundf(blocks * inverse).to(torch.int8).view(torch.uint8)
    return torch.cat([fp16_bytes(d), codes], dim=-1)


def dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """``gguf.quants.Q4_0.dequantize_blocks`` in torch."""
    codes = _unnibble(blocks[:, FP16_BYTES:]).to(torch.int8) - 8
    return fp16_at(blocks, 0) * codes.float()


def dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """``gguf.quants.Q5_0.dequantize_blocks`` in torch."""
    bit = torch.arange(8, device=blocks.device, dtype=torch.uint8)
    high = ((blocks[:, 2:6].unsqueeze(-1) >> bit) & 1).reshape(-1, 32)
    codes = (_unnibble(blocks[:, 6:]) | (high << 4)).to(torch.int8) - 16
    return fp16_at(blocks, 0) * codes.float()


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """``gguf.quants.Q8_0.dequantize_blocks`` in torch."""
    return blocks[:, FP16_BYTES:].contiguous().view(torch.int8).float() * fp16_at(blocks, 0)
