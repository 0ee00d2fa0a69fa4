"""NormalFloat / integer quantization with double-quantized scales.

Layout rule for any shape: the weight is flattened and zero-padded to a multiple of
``block_size``; the first-level scales are padded to a multiple of ``scale_block_size`` with
the offset (so their codes are 0). Padding is stored and counted in ``nbytes``; for matrices
whose size is a multiple of ``block_size * scale_block_size`` there is none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from coalora.quant.codebook import codebook_on, level_grid, packed_level_table_on
from coalora.quant.config import SCALE_DTYPE_WIDTH, Format, QuantConfig, ScaleDtype
from coalora.quant.packing import pack, unpack

TORCH_SCALE_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

CHUNK_WEIGHTS = 2**18
"""Weights :func:`quantize` (and :func:`~coalora.quant.errors.matrix_errors`) work on at a time
on a CPU: fp32 temporaries of 1 MiB stay in the cache and are memory the allocator reuses,
where whole-matrix temporaries would fault in fresh pages every time. Other devices take the
whole tensor in one pass."""


class ScaleOverflowError(ValueError):
    """The second-level scales of a tensor exceed the largest finite value of their dtype."""


def to_blocks(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten ``w`` to fp32 and zero-pad it into rows of ``block_size`` weights.

    Without padding, a contiguous fp32 ``w`` is viewed, not copied.
    """
    flat = w.detach().reshape(-1).float()
    padding = -flat.numel() % block_size
    return (F.pad(flat, (0, padding)) if padding else flat).view(-1, block_size)


def empty_fp32(count: int, device: torch.device) -> torch.Tensor:
    """An uninitialised fp32 vector of ``count`` entries.

    On a CPU NumPy allocates it: NumPy asks Linux for transparent huge pages on large arrays,
    and faulting in fresh 4 KiB pages costs more than the dequantization that fills them.
    """
    if device.type == "cpu":
        return torch.from_numpy(np.empty(count, dtype=np.float32))
    return torch.empty(count, device=device)


@dataclass(frozen=True)
class DoubleQuantizedScales:
    """First-level scales (one per block) stored as ``scale_bits`` unsigned ints.

    ``dequantized = offset + codes * second / (2^scale_bits - 1)``, with ``second`` the
    per-group second-level scale held in ``scale_dtype``.
    """

    codes: torch.Tensor  # (groups * scale_block_size,) uint8, padded with zeros
    second: torch.Tensor  # (groups,) in the scale dtype
    offset: torch.Tensor  # () fp32: the smallest first-level scale
    dequantized: torch.Tensor  # (blocks,) fp32


def double_quantize(
    absmax: torch.Tensor,
    scale_bits: int,
    scale_dtype: ScaleDtype,
    scale_block_size: int,
    check_overflow: bool = True,
) -> DoubleQuantizedScales:
    """Quantize the first-level scales ``absmax``.

    Args:
        absmax: the first-level scales, one per block.
        scale_bits, scale_dtype, scale_block_size: the configuration's b1, b2 and B1.
        check_overflow: raise :class:`ScaleOverflowError` if a second-level scale overflows
            ``scale_dtype`` (a device sync); otherwise the dequantized scales of such groups
            are NaN and ``second`` holds ``inf``.
    """
    offset = absmax.min()
    shifted = F.pad(absmax - offset, (0, -absmax.numel() % scale_block_size))
    groups = shifted.view(-1, scale_block_size)
    largest = groups.amax(dim=1)
    second = largest.to(TORCH_SCALE_DTYPES[scale_dtype])
    if check_overflow and not torch.isfinite(second).all():
        finite_max = torch.finfo(second.dtype).max
        raise ScaleOverflowError(
            f"second-level scales overflow scale_dtype={scale_dtype!r}: its largest finite "
            f"value is {finite_max:.6g}, this tensor's largest second-level scale is "
            f"{largest.max().item():.6g}; choose a wider scale_dtype"
        )
    top = 2**scale_bits - 1
    step = second.float().unsqueeze(1) / top
    safe_step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.where(step > 0, torch.round(groups / safe_step), torch.zeros_like(groups))
    codes = codes.clamp_(0, top)
    dequantized = (offset + codes * step).view(-1)[: absmax.numel()]
    return DoubleQuantizedScales(codes.view(-1).to(torch.uint8), second, offset, dequantized)


def block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """Largest absolute value of each row of ``blocks`` (NaN where a row holds NaN): two
    reductions, without the full-size temporary of ``blocks.abs()``."""
    return torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_())


def normalize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Divide each block by its scale; an all-zero scale gives zeros instead of NaN."""
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
    return blocks / safe


def nearest_codes(x: torch.Tensor, fmt: Format, bits: int) -> torch.Tensor:
    """Index (uint8) of the nearest ``fmt``/``bits`` level for every entry of ``x``."""
    return level_grid(fmt).codes(x, bits)


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized weight: packed codes plus double-quantized scales.

    Attributes:
        config: the :class:`QuantConfig` it was quantized with.
        shape, dtype: of the original tensor, restored by :meth:`dequantize`.
        codes: packed ``bits``-bit level indices (uint8).
        scale_codes: packed ``scale_bits``-bit first-level scale codes (uint8).
        second_scales: second-level scales in ``config.scale_dtype``.
        offset: fp32 scalar subtracted from the first-level scales before quantizing them.
    """

    config: QuantConfig
    shape: torch.Size
    dtype: torch.dtype
    codes: torch.Tensor
    scale_codes: torch.Tensor
    second_scales: torch.Tensor
    offset: torch.Tensor

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.config.block_size)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes, both scale levels and the offset."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.codes, self.scale_codes, self.second_scales, self.offset)
        )

    def dequantized_scales(self) -> torch.Tensor:
        """The first-level scales as fp32, one per block."""
        cfg = self.config
        count = self.second_scales.numel() * cfg.scale_block_size
        codes = unpack(self.scale_codes, cfg.scale_bits, count).view(-1, cfg.scale_block_size)
        step = self.second_scales.float().unsqueeze(1) / (2**cfg.scale_bits - 1)
        return (self.offset + codes * step).view(-1)[: self.num_blocks]

    def dequantize(self) -> torch.Tensor:
        """The dense tensor, same shape and dtype as the original.

        ``levels[codes] * scale``: 2-, 4- and 8-bit codes gather whole rows of
        :func:`packed_level_table`, one row per packed byte or 16-bit word; 3-bit codes are
        unpacked first. The scales multiply the levels in place.
        """
        cfg = self.config
        device = self.codes.device
        count = self.num_blocks * cfg.block_size
        dense = empty_fp32(count, device)
        if 8 % cfg.bits == 0:
            table, index_dtype = packed_level_table_on(cfg.fmt, cfg.bits, device)
            index = self.codes.view(index_dtype).int()
            torch.index_select(table, 0, index, out=dense.view(table.dtype))
        else:
            levels = codebook_on(cfg.fmt, cfg.bits, device)
            torch.index_select(levels, 0, unpack(self.codes, cfg.bits, count), out=dense)
        dense.view(-1, cfg.block_size).mul_(self.dequantized_scales().unsqueeze(1))
        return dense[: self.numel].view(self.shape).to(self.dtype)


PACKED_FIELDS: tuple[str, ...] = ("codes", "scale_codes", "second_scales", "offset")
"""The tensors of a :class:`QuantizedTensor`, in its field order after ``config``, ``shape``
and ``dtype``: the only bytes a packed weight holds."""

OFFSET_BYTES = 4
"""Each quantized tensor stores one fp32 offset."""


def packed_nbytes(numel: int, config: QuantConfig) -> int:
    """Bytes :func:`quantize` stores for ``numel`` weights under ``config`` (its
    ``QuantizedTensor.nbytes``), without quantizing: codes and first-level scale codes padded
    to whole blocks and scale groups, the second-level scales and the offset."""
    blocks = -(-numel // config.block_size)
    groups = -(-blocks // config.scale_block_size)
    return (
        blocks * config.block_size * config.bits // 8
        + groups * config.scale_block_size * config.scale_bits // 8
        + groups * SCALE_DTYPE_WIDTH[config.scale_dtype] // 8
        + OFFSET_BYTES
    )


def quantize(w: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
    """Quantize ``w`` with ``config``.

    Any shape, layout and floating-point dtype: ``w`` is quantized in fp32, on its device, and
    :meth:`QuantizedTensor.dequantize` returns its shape and dtype. A CPU codes
    ``CHUNK_WEIGHTS`` weights at a time; other devices code the whole tensor in one pass.

    Raises ``TypeError`` for a ``w`` that is not a tensor, ``ValueError`` for non-float, empty
    or non-finite ``w``, and :class:`ScaleOverflowError` (a ``ValueError``) if its scales
    overflow ``config.scale_dtype``.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize needs a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise ValueError(f"quantize needs a floating-point tensor, got dtype {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"quantize needs a non-empty tensor, got shape {tuple(w.shape)}")
    blocks = to_blocks(w, config.block_size)
    absmax = block_absmax(blocks)
    if not torch.isfinite(absmax).all():  # a NaN or infinite weight makes its block's so
        nan, inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
        raise ValueError(
            f"quantize got NaN or infinite weights ({nan} NaN and {inf} infinite of {w.numel()})"
        )
    scales = double_quantize(absmax, config.scale_bits, config.scale_dtype, config.scale_block_size)
    if blocks.device.type == "cpu":
        codes = torch.empty(blocks.shape, dtype=torch.uint8, device=blocks.device)
        rows = CHUNK_WEIGHTS // config.block_size
        for start in range(0, len(blocks), rows):
            part = slice(start, start + rows)
            x = normalize(blocks[part], scales.dequantized[part])
            codes[part] = nearest_codes(x, config.fmt, config.bits)
    else:
        codes = nearest_codes(normalize(blocks, scales.dequantized), config.fmt, config.bits)
    return QuantizedTensor(
        config=config,
        shape=w.shape,
        dtype=w.dtype,
        codes=pack(codes.view(-1), config.bits),
        scale_codes=pack(scales.codes, config.scale_bits),
        second_scales=scales.second,
        offset=scales.offset.float(),
    )
