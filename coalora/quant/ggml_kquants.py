"""Q2_K, Q3_K, Q4_K, Q5_K and Q6_K super-blocks of 256 weights.

The quantizers are ``quantize_row_q*_K_ref`` of llama.cpp's ggml-quants.c (what
``ggml_quantize_chunk`` runs without an importance matrix), their scale searches in
:mod:`coalora.quant.ggml_kquant_search` (whose fp32 arithmetic, sums in index order, strict
comparisons and tensor divisors, they follow too); the dequantizers repeat the arithmetic of
``gguf.quants``. Each function takes one block per row: fp32 weights ``(n, 256)`` or uint8 bytes
``(n, bytes_per_block)``.
"""

from __future__ import annotations

import torch

from coalora.quant.ggml_kquant_search import (
    GROUP_MAX_EPS,
    make_q3_quants,
    make_qkx2_quants,
    make_qx_quants,
    nearest_int,
    positive_max,
    sqrtf,
    sum_in_order,
)
from coalora.quant.ggml_legacy import constant, fp16_at, fp16_bytes, fp16_round, signed_absmax


def _shifts(like: torch.Tensor, *amounts: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Bit shifts as a uint8 tensor of ``shape`` on ``like``'s device."""
    return torch.tensor(amounts, dtype=torch.uint8, device=like.device).view(shape)


def _position_major(x: torch.Tensor, group: int) -> torch.Tensor:
    """Blocks ``(n, 256)`` as groups stored position-major ``(group, n * 256 / group)``.

    The per-position loops of the C code then step through contiguous rows.
    """
    return x.reshape(-1, group).T.contiguous()


def _crumbs(levels: torch.Tensor) -> torch.Tensor:
    """2-bit codes ``(n, 256)`` as ``qs[64]``: byte ``32h + l`` holds codes ``128h + 32k + l``."""
    q = levels.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _nibbles(levels: torch.Tensor) -> torch.Tensor:
    """Low 4 bits of codes ``(n, 256)`` as ``qs[128]``: byte ``32h + l`` holds codes ``64h + l``
    (low nibble) and ``64h + 32 + l`` (high nibble)."""
    q = levels.reshape(-1, 4, 2, 32) & 0xF
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _bit_planes(bits: torch.Tensor) -> torch.Tensor:
    """One bit per code ``(n, 256)`` as 32 bytes: bit ``k`` of byte ``l`` is code ``32k + l``."""
    k = torch.arange(8, dtype=torch.int32, device=bits.device)[:, None]
    return (bits.reshape(-1, 8, 32).int() << k).sum(1)


def _requantize(
    x: torch.Tensor, step: torch.Tensor, levels: torch.Tensor, lo: int, hi: int
) -> torch.Tensor:
    """Codes ``clamp(nearest_int(x / step), lo, hi) - lo`` of groups ``(n, k, group)``, int32
    ``(n, 256)``; groups whose ``step`` is 0 keep their position-major ``levels`` (C's
    ``if (!d) continue``)."""
    fresh = nearest_int(x / step[..., None]).clamp(lo, hi) - lo
    kept = levels.T.reshape(fresh.shape).int()
    return torch.where(step[..., None] != 0, fresh, kept).reshape(-1, 256)


def quantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """``block_q2_K``: scales[16] (4-bit scale | 4-bit min << 4), qs[64], d, dmin.

    Per 16 weights ``w = d * sc * q - dmin * m`` with ``q`` in ``[0, 3]``.
    """
    n = blocks.shape[0]
    x = blocks.reshape(n, 16, 16)
    groups = _position_major(x, 16)
    scales, mins, levels = make_qkx2_quants(groups, groups.abs(), 3, -0.5, 15, True)
    scales, mins = scales.view(n, 16), mins.view(n, 16)
    max_scale, max_min = positive_max(scales), positive_max(mins)
    fifteen = constant(blocks, 15.0)
    scale_codes = torch.where(max_scale > 0, nearest_int(fifteen / max_scale * scales), 0)
    min_codes = torch.where(max_min > 0, nearest_int(fifteen / max_min * mins), 0)
    packed = (scale_codes & 0xFF) | ((min_codes << 4) & 0xFF)  # C stores into uint8
    d, dmin = max_scale / fifteen, max_min / fifteen
    step = fp16_round(d) * (packed & 0xF).float()
    shift = fp16_round(dmin) * (packed >> 4).float()
    levels = _requantize(x + shift[..., None], step, levels, 0, 3)
    parts = [packed, _crumbs(levels), fp16_bytes(d), fp16_bytes(dmin)]
    return torch.cat([p.to(torch.uint8) for p in parts], dim=-1)


def quantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """``block_q3_K``: hmask[32] (third bits), qs[64], scales[12] (6-bit), d.

    Per 16 weights ``w = d * (sc - 32) * (q - 4)`` with ``q`` in ``[0, 7]``.
    """
    n = blocks.shape[0]
    x = blocks.reshape(n, 16, 16)
    scales, levels = make_q3_quants(_position_major(x, 16), 4)
    scales = scales.view(n, 16)
    peak = signed_absmax(scales)
    inverse_scale = constant(blocks, -32.0) / peak
    codes = torch.where(peak != 0, nearest_int(inverse_scale * scales).clamp(-32, 31) + 32, 0)
    d = torch.where(peak != 0, constant(blocks, 1.0) / inverse_scale, 0.0)
    levels = _requantize(x, fp16_round(d) * (codes - 32).float(), levels, -4, 3)
    low = codes & 0xF
    high = (codes >> 4).view(n, 4, 4) << (2 * torch.arange(4, device=blocks.device)[:, None])
    packed = torch.cat([low[:, :8] | (low[:, 8:] << 4), high.sum(1)], dim=-1)
    parts = [_bit_planes(levels > 3), _crumbs(levels & 3), packed, fp16_bytes(d)]
    return torch.cat([p.to(torch.uint8) for p in parts], dim=-1)


def _quantize_q45_k(
    blocks: torch.Tensor, nmax: int, rmin: float, nstep: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Shared part of Q4_K and Q5_K: ``[d, dmin, scales[12]]`` bytes and the codes ``(n, 256)``."""
    n = blocks.shape[0]
    x = blocks.reshape(n, 8, 32)
    groups = _position_major(x, 32)
    spread = sqrtf(sum_in_order(groups * groups) / 32)
    weights = spread + groups.abs()
    scales, mins, levels = make_qkx2_quants(groups, weights, nmax, rmin, nstep, False)
    scales, mins = scales.view(n, 8), mins.view(n, 8)
    max_scale, max_min = positive_max(scales), positive_max(mins)
    top = constant(blocks, 63.0)
    inverse_scale = torch.where(max_scale > 0, top / max_scale, 0.0)
    inverse_min = torch.where(max_min > 0, top / max_min, 0.0)
    # C: uint8_t ls = nearest_int(...); ls = MIN(63, ls)
    scale_codes = (nearest_int(inverse_scale * scales) & 0xFF).clamp(max=63)
    min_codes = (nearest_int(inverse_min * mins) & 0xFF).clamp(max=63)
    d, dmin = max_scale / top, max_min / top
    step = fp16_round(d) * scale_codes.float()
    shift = fp16_round(dmin) * min_codes.float()
    levels = _requantize(x + shift[..., None], step, levels, 0, nmax)
    ls, lm = scale_codes, min_codes
    packed = torch.cat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
        ],
        dim=-1,
    )
    return [fp16_bytes(d), fp16_bytes(dmin), packed.to(torch.uint8)], levels


def quantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """``block_q4_K``: d, dmin, scales[12] (6-bit scales and mins), qs[128].

    Per 32 weights ``w = d * sc * q - dmin * m`` with ``q`` in ``[0, 15]``.
    """
    head, levels = _quantize_q45_k(blocks, 15, -1.0, 20)
    return torch.cat([*head, _nibbles(levels).to(torch.uint8)], dim=-1)


def quantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """``block_q5_K``: d, dmin, scales[12], qh[32] (fifth bits), qs[128]; ``q`` in ``[0, 31]``."""
    head, levels = _quantize_q45_k(blocks, 31, -0.5, 15)
    parts = [_bit_planes(levels > 15), _nibbles(levels)]
    return torch.cat([*head, *(p.to(torch.uint8) for p in parts)], dim=-1)


def quantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """``block_q6_K``: ql[128], qh[64], scales[16] (int8), d.

    Per 16 weights ``w = d * sc * (q - 32)`` with ``q`` in ``[0, 63]``.
    """
    n = blocks.shape[0]
    x = blocks.reshape(n, 16, 16)
    scales, levels = make_qx_quants(_position_major(x, 16), 32)
    scales = scales.view(n, 16)
    peak = signed_absmax(scales)
    inverse_scale = constant(blocks, -128.0) / peak
    codes = nearest_int(inverse_scale * scales).clamp(max=127)
    d = constant(blocks, 1.0) / inverse_scale
    levels = _requantize(x, fp16_round(d) * codes.float(), levels, -32, 31)
    q = levels.reshape(n, 2, 4, 32)
    nibble = q & 0xF
    low = torch.cat(
        [nibble[:, :, 0] | (nibble[:, :, 2] << 4), nibble[:, :, 1] | (nibble[:, :, 3] << 4)], -1
    )
    high = sum((q[:, :, k] >> 4) << (2 * k) for k in range(4))
    parts = [
        low.reshape(n, 128),
        high.reshape(n, 64),
        codes.to(torch.int8).view(torch.uint8),
        fp16_bytes(d),
    ]
    packed = torch.cat([p.to(torch.uint8) for p in parts], dim=-1)
    zero = peak.abs() < constant(blocks, GROUP_MAX_EPS)
    return torch.where(zero, 0, packed)


def dequantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """``gguf.quants.Q2_K.dequantize_blocks`` in torch."""
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    step = (fp16_at(blocks, 80) * (scales & 0xF).float()).view(n, 16, 1)
    shift = (fp16_at(blocks, 82) * (scales >> 4).float()).view(n, 16, 1)
    q = (qs.reshape(n, 2, 1, 32) >> _shifts(blocks, 0, 2, 4, 6, shape=(1, 1, 4, 1))) & 3
    return (step * q.reshape(n, 16, 16).float() - shift).reshape(n, 256)


def dequantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """``gguf.quants.Q3_K.dequantize_blocks`` in torch."""
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts(blocks, 0, 4, shape=(1, 2, 1))).reshape(n, 16)
    crumb_shifts = _shifts(blocks, 0, 2, 4, 6, shape=(1, 1, 4, 1))
    high = (scales[:, 8:].reshape(n, 1, 1, 4) >> crumb_shifts).reshape(n, 16)
    sc = (((low & 0xF) | ((high & 3) << 4)).to(torch.int8) - 32).float()
    step = (fp16_at(blocks, 108) * sc).view(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> crumb_shifts) & 3
    qh = ((hmask.reshape(n, 1, 32) >> _shifts(blocks, *range(8), shape=(1, 8, 1))) & 1) ^ 1
    q = ql.reshape(n, 16, 16).to(torch.int8) - (qh.reshape(n, 16, 16) << 2).to(torch.int8)
    return (step * q.float()).reshape(n, 256)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins of Q4_K/Q5_K ``scales[12]`` (``get_scale_min_k4``)."""
    d, m, low = scales[:, :4], scales[:, 4:8], scales[:, 8:]
    sc = torch.cat([d & 0x3F, (low & 0xF) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (low >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _dequantize_q45_k(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``d * sc * q - dmin * m`` per 32 codes ``q`` ``(n, 8, 32)``, as gguf evaluates it."""
    n = blocks.shape[0]
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    step = (fp16_at(blocks, 0) * sc.float()).view(n, 8, 1)
    shift = (fp16_at(blocks, 2) * mn.float()).view(n, 8, 1)
    return (step * q.float() - shift).reshape(n, 256)


def dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """``gguf.quants.Q4_K.dequantize_blocks`` in torch."""
    n = blocks.shape[0]
    q = (blocks[:, 16:].reshape(n, 4, 1, 32) >> _shifts(blocks, 0, 4, shape=(1, 1, 2, 1))) & 0xF
    return _dequantize_q45_k(blocks, q.reshape(n, 8, 32))


def dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """``gguf.quants.Q5_K.dequantize_blocks`` in torch."""
    n = blocks.shape[0]
    ql = (blocks[:, 48:].reshape(n, 4, 1, 32) >> _shifts(blocks, 0, 4, shape=(1, 1, 2, 1))) & 0xF
    qh = (blocks[:, 16:48].reshape(n, 1, 32) >> _shifts(blocks, *range(8), shape=(1, 8, 1))) & 1
    return _dequantize_q45_k(blocks, ql.reshape(n, 8, 32) | (qh << 4))


def dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """``gguf.quants.Q6_K.dequantize_blocks`` in torch."""
    n = blocks.shape[0]
    sc = blocks[:, 192:208].contiguous().view(torch.int8).float()
    step = (fp16_at(blocks, 208) * sc).view(n, 16, 1)
    ql = (blocks[:, :128].reshape(n, 2, 1, 64) >> _shifts(blocks, 0, 4, shape=(1, 1, 2, 1))) & 0xF
    crumb_shifts = _shifts(blocks, 0, 2, 4, 6, shape=(1, 1, 4, 1))
    qh = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> crumb_shifts) & 3
    q = (ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (step * q.reshape(n, 16, 16).float()).reshape(n, 256)
