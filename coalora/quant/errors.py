"""Quantization errors of one matrix: ``‖W_i − Q_j(W_i)‖²`` (optionally Fisher-weighted) of
every option j, exact or estimated on a sample of its chunks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coalora.quant.codebook import level_grid, nearest_level_pairs
from coalora.quant.config import Format, QuantConfig
from coalora.quant.error_sampling import (
    SAMPLE_CHUNK_WEIGHTS,
    check_sample_fraction,
    chunk_energy,
    sample_chunks,
    sample_size,
)
from coalora.quant.ggml_tensor import GGMLConfig, quantize_to_ggml
from coalora.quant.tensor import CHUNK_WEIGHTS, block_absmax, double_quantize, to_blocks


def matrix_errors(
    w: torch.Tensor,
    options: Sequence[QuantConfig] | Sequence[GGMLConfig],
    fisher: torch.Tensor | None = None,
    sample_fraction: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Error ``((w - quantize(w, o).dequantize())**2 * fisher).sum()`` of each option ``o``.

    Computed on ``w``'s device; only the final per-option errors (float64, on the CPU) come
    back, in one transfer. Work is shared between options: per block size the blocks and their
    absmax; per scale setting (scale bits, dtype and block size) the dequantized scales, the
    normalised weights and their grid cells; per bit width only the distance to the nearest
    level, ``(|x - m| - h)^2`` with the midpoint ``m`` and half-gap ``h`` of the cell's two
    candidate levels (:func:`nearest_level_pairs`), which equals the codes' squared error up to
    float rounding. A CPU works through ``CHUNK_WEIGHTS`` weights at a time (temporaries that
    stay in its cache); other devices take the whole matrix in one pass. An option whose
    second-level scales overflow its ``scale_dtype`` (``quantize`` raises) gets ``+inf``: it is
    unusable for this matrix. llama.cpp types (:class:`GGMLConfig`) are quantized and
    dequantized one at a time, exactly; a type that cannot store ``w`` (rows not a multiple of
    its block) gets ``+inf``.

    Args:
        w: the weight matrix (any shape; flattened and padded as :func:`quantize` does).
        options: the quantization options.
        fisher: optional per-weight weights of the squared error (a diagonal Fisher estimate),
            same shape as ``w``.
        sample_fraction: ``None`` for the exact errors; otherwise estimate them on about this
            fraction of the weights, in (0, 1]. The scales (hence the second-level offset and
            any overflow) are always the whole matrix's, and so is the error of the weights
            the scales clip (``|w| > scale``, cheap to sum exactly); the rest, the error
            inside the levels' range, is computed exactly on whole chunks drawn by
            :func:`sample_chunks` (the same chunks for every option, so that differences
            between options are estimated more precisely than each error) and on the weights
            after the last whole chunk, and scaled by how many chunks each drawn one stands
            for. The estimate is unbiased; matrices of few chunks are done exactly.
        seed: seed of the chunk draw.
    """
    if fisher is not None and fisher.shape != w.shape:
        raise ValueError(f"fisher shape {tuple(fisher.shape)} differs from weight {tuple(w.shape)}")
    check_sample_fraction(sample_fraction)
    if not torch.isfinite(w).all():
        raise ValueError("matrix_errors got NaN or infinite weights")
    kinds = {type(o) for o in options}
    if GGMLConfig in kinds:
        if kinds != {GGMLConfig}:
            raise ValueError("matrix_errors got llama.cpp types mixed with other options")
        if sample_fraction is not None:
            raise ValueError(
                f"sample_fraction={sample_fraction}: llama.cpp types have exact error tables "
                "only; leave it unset (null)"
            )
        return _ggml_errors(w, options, fisher)
    flat = w.detach().reshape(-1).float()
    flat_fisher = None if fisher is None else fisher.detach().reshape(-1).float().to(flat.device)
    chunks = None
    whole = flat.numel() // SAMPLE_CHUNK_WEIGHTS
    if sample_fraction is not None and sample_size(whole, sample_fraction) is not None:
        energy = chunk_energy(flat, flat_fisher)
        chunks = tuple(t.to(flat.device) for t in sample_chunks(energy, sample_fraction, seed))
    return _option_errors(flat, flat_fisher, options, chunks).cpu()


def _ggml_errors(
    w: torch.Tensor, options: Sequence[GGMLConfig], fisher: torch.Tensor | None
) -> torch.Tensor:
    """Exact errors (float64, on the CPU) of llama.cpp types; ``+inf`` where one does not fit."""
    errors = torch.full((len(options),), math.inf, dtype=torch.float64)
    dense = w.detach().float()
    for j, option in enumerate(options):
        if option.fits(w.shape):
            diff = quantize_to_ggml(dense, option).dequantize().sub_(dense).square_()
            if fisher is not None:
                diff.mul_(fisher.to(diff.device))
            errors[j] = diff.sum(dtype=torch.float64).cpu()
    return errors


def _block_absmax(flat: torch.Tensor, block_sizes: Sequence[int]) -> dict[int, torch.Tensor]:
    """Absmax of every block of ``to_blocks(flat, bs)`` for each block size, from one pass: a
    block of ``bs`` is ``bs / smallest`` whole blocks of the smallest size (all sizes are
    powers of two), and zero padding never raises a maximum."""
    smallest = min(block_sizes)
    base = block_absmax(to_blocks(flat, smallest))
    out = {}
    for bs in block_sizes:
        ratio = bs // smallest
        if bs % smallest:
            out[bs] = block_absmax(to_blocks(flat, bs))
        elif ratio == 1:
            out[bs] = base
        else:
            out[bs] = F.pad(base, (0, -base.numel() % ratio)).view(-1, ratio).amax(dim=1)
    return out


@dataclass(frozen=True)
class _Sample:
    """The blocks of one block size that a sampled estimate computes the in-range error on."""

    blocks: torch.Tensor  # (sampled blocks, block_size) fp32
    fisher: torch.Tensor | None  # the same blocks' Fisher weights
    position: torch.Tensor  # (sampled blocks,) int64: their index among all blocks
    weight: torch.Tensor  # (sampled blocks,) float64: how many blocks each stands for

    @classmethod
    def of(
        cls,
        flat: torch.Tensor,
        flat_fisher: torch.Tensor | None,
        block_size: int,
        chunks: tuple[torch.Tensor, torch.Tensor],
    ) -> _Sample:
        index, chunk_weight = chunks
        device = flat.device
        whole = flat.numel() // SAMPLE_CHUNK_WEIGHTS * SAMPLE_CHUNK_WEIGHTS

        def take(x: torch.Tensor) -> torch.Tensor:
            picked = x[:whole].view(-1, SAMPLE_CHUNK_WEIGHTS).index_select(0, index)
            return to_blocks(torch.cat([picked.view(-1), x[whole:]]), block_size)

        per_chunk = SAMPLE_CHUNK_WEIGHTS // block_size
        first = index.unsqueeze(1) * per_chunk
        tail = torch.arange(whole // block_size, -(-flat.numel() // block_size), device=device)
        position = torch.cat([(first + torch.arange(per_chunk, device=device)).view(-1), tail])
        weight = torch.cat(
            [chunk_weight.repeat_interleave(per_chunk), chunk_weight.new_ones(len(tail))]
        )
        return cls(take(flat), None if flat_fisher is None else take(flat_fisher), position, weight)


def _option_errors(
    flat: torch.Tensor,
    flat_fisher: torch.Tensor | None,
    options: Sequence[QuantConfig],
    chunks: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Errors (float64, on ``flat``'s device) of ``options`` on the flat fp32 weights ``flat``:
    exact, or estimated on the ``chunks`` ``(index, weight)`` of :func:`sample_chunks`."""
    device = flat.device
    rows = CHUNK_WEIGHTS if device.type == "cpu" else None

    def layout(i: int) -> tuple[int, int, str, int, str]:
        o = options[i]
        return o.block_size, o.scale_block_size, o.scale_dtype, o.scale_bits, o.fmt

    order = sorted(range(len(options)), key=layout)
    absmax = _block_absmax(flat, sorted({o.block_size for o in options}))
    results, members_in_order = [], []
    for block_size, by_block in itertools.groupby(order, key=lambda i: options[i].block_size):
        blocks = to_blocks(flat, block_size)
        fisher_blocks = None if flat_fisher is None else to_blocks(flat_fisher, block_size)
        if chunks is None:
            energy = blocks.square()
            if fisher_blocks is not None:
                energy.mul_(fisher_blocks)
            energy = energy.sum(dim=1, dtype=torch.float64)  # the error of a block set to 0
        else:
            sample = _Sample.of(flat, flat_fisher, block_size, chunks)
            magnitude = blocks.abs()
        for (_, group, scale_dtype, scale_bits, fmt), members in itertools.groupby(
            by_block, key=layout
        ):
            members = list(members)
            bits = [options[i].bits for i in members]
            quantized = double_quantize(
                absmax[block_size], scale_bits, scale_dtype, group, check_overflow=False
            )
            scales = quantized.dequantized
            scale_sq = scales.double().square_()
            if chunks is None:
                error = _normalized_block_errors(blocks, fisher_blocks, scales, fmt, bits, rows)
                # Blocks whose scale dequantizes to 0 reconstruct as zeros: their error is ‖w‖².
                error = error.double() @ scale_sq + torch.where(scales == 0, energy, 0.0).sum()
            else:
                inside = _normalized_block_errors(
                    sample.blocks, sample.fisher, scales[sample.position], fmt, bits, rows, True
                )
                clipped = _clipped_error(magnitude, fisher_blocks, scales, rows)
                error = inside.double() @ (scale_sq[sample.position] * sample.weight) + clipped
            overflow = ~torch.isfinite(quantized.second).all()
            results.append(torch.where(overflow, math.inf, error))
            members_in_order += members
    errors = torch.empty(len(options), dtype=torch.float64, device=device)
    errors[torch.tensor(members_in_order, device=device)] = torch.cat(results)
    return errors


def _clipped_error(
    magnitude: torch.Tensor,
    fisher_blocks: torch.Tensor | None,
    scales: torch.Tensor,
    rows_weights: int | None,
) -> torch.Tensor:
    """``Σ fisher · (|w| − scale)²`` over the weights beyond their block's scale: the error
    of the weights clipped to the outermost levels (all of a block whose scale is 0), as a
    float64 scalar. ``magnitude`` is ``|blocks|``; ``rows_weights`` weights at a time."""
    count, block_size = magnitude.shape
    rows = count if rows_weights is None else max(1, rows_weights // block_size)
    total = torch.zeros((), dtype=torch.float64, device=magnitude.device)
    for start in range(0, count, rows):
        part = slice(start, start + rows)
        excess = (magnitude[part] - scales[part].unsqueeze(1)).clamp_(min=0).square_()
        if fisher_blocks is not None:
            excess.mul_(fisher_blocks[part])
        total += excess.sum(dim=1).sum(dtype=torch.float64)
    return total


def _normalized_block_errors(
    blocks: torch.Tensor,
    fisher_blocks: torch.Tensor | None,
    scales: torch.Tensor,
    fmt: Format,
    bits: Sequence[int],
    rows_weights: int | None,
    inside_only: bool = False,
) -> torch.Tensor:
    """``(len(bits), blocks)`` fp32: per block, the (Fisher-weighted) squared distance of the
    normalised weights ``blocks / scales`` to their nearest level, for each bit width;
    ``rows_weights`` weights at a time (``None``: all at once). Blocks whose scale is 0 or NaN
    count as all-zero (their scale² weights them anyway). ``inside_only`` leaves out the
    weights beyond ±1 (clipped), as if they sat on the outermost level."""
    count, block_size = blocks.shape
    grid = level_grid(fmt)
    pairs = [nearest_level_pairs(fmt, b, blocks.device) for b in bits]
    safe = torch.where(scales > 0, scales, math.inf).unsqueeze(1)
    out = torch.empty(len(bits), count, device=blocks.device)
    rows = count if rows_weights is None else max(1, rows_weights // block_size)
    size = min(rows, count) * block_size
    x_buf, d_buf, h_buf = (torch.empty(size, device=blocks.device) for _ in range(3))
    for start in range(0, count, rows):
        part = slice(start, start + rows)
        n = min(rows, count - start) * block_size
        x = torch.div(blocks[part], safe[part], out=x_buf[:n].view(-1, block_size))
        if inside_only:
            x.clamp_(-1.0, 1.0)
        cell = grid.cell_of(x, torch.int64).view(-1)
        x = x.view(-1)
        d, h = d_buf[:n], h_buf[:n]
        for j, (mid, half) in enumerate(pairs):
            torch.index_select(mid, 0, cell, out=d)
            d.sub_(x).abs_().sub_(torch.index_select(half, 0, cell, out=h))
            d.square_()
            if fisher_blocks is not None:
                d.mul_(fisher_blocks[part].reshape(-1))
            torch.sum(d.view(-1, block_size), dim=1, out=out[j, part])
    return out
